"""``trident-reembed``: rebuild a collection with another model while it keeps serving."""
