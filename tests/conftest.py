"""Shared test setup: every test (and every script a test launches) uses a private cache folder.

The model scripts generate the built-in synthetic dataset, and cache trained detectors, under
$SGG_ALIGN_CACHE (default ~/.cache/sgg_align). Tests must never read a user's cache (a stale or
larger one would make them pass or fail for the wrong reason) nor write into it, so we point the
variable at one temporary folder for the whole session; subprocesses inherit it. The synthetic data
is then generated once per test session and shared by all test files.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so tests import data, metrics, kernels and the model scripts

if "SGG_ALIGN_TEST_KEEP_CACHE" not in os.environ:
    os.environ["SGG_ALIGN_CACHE"] = tempfile.mkdtemp(prefix="sgg_align_test_cache_")
