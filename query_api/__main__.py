"""``python -m query_api``: serve the query API (the earlier ``python -m src.api_server``)."""

import sys

from query_api.cli import main

sys.exit(main())
