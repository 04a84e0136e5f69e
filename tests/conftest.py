"""Settings every test shares."""

import os
import tempfile

# Distilled test suites are cached under the user's cache folder by default; tests keep theirs apart, in
# one folder for the session (subprocesses inherit it), so they neither read a stale cache nor leave one.
_SUITES = tempfile.TemporaryDirectory(prefix="text2sql-suites-")
os.environ["TEXT2SQL_CACHE"] = _SUITES.name
