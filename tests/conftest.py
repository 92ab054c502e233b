"""Suite-wide settings."""

from __future__ import annotations

import os

# Full argument checks in the cache's hot paths (off by default for speed): the tests
# exercise them, and a bad append fails loudly instead of corrupting the cache.
os.environ.setdefault("KVCOMPRESS_DEBUG", "1")
