"""The local development and test stack: real Kafka, Milvus and Triton servers on loopback.

Public surface: :class:`LocalStack` (Python API used by the tests) and the ``trident-stack`` CLI.
"""
