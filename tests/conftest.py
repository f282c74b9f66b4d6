"""Shared test setup: every test (and every script a test launches) uses a private cache folder.

The model scripts generate the built-in synthetic dataset, and cache trained detectors, under
$SGG_ALIGN_CACHE (default ~/.cache/sgg_align). Tests must never read a user's cache (a stale or
larger one would make them pass or fail for the wrong reason) nor write into it, so we point the
variable at one temporary folder for the whole session; subprocesses inherit it. The synthetic data
is then generated once per test session and shared by all test files.
"""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so tests import data, metrics, kernels and the model scripts

if "SGG_ALIGN_TEST_KEEP_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sgg_align_test_cache_")
    os.environ["SGG_ALIGN_CACHE"] = _cache
    # The folder is ours alone (made just above), so removing it at exit deletes no user data.
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
