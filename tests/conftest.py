"""Shared test setup: every test (and every script a test launches) uses a private cache folder and a private
temporary folder, and Triton's settings are explicit.

The model scripts generate the built-in synthetic dataset, and cache trained detectors, under
$SGG_ALIGN_CACHE (default ~/.cache/sgg_align). Tests must never read a user's cache (a stale or
larger one would make them pass or fail for the wrong reason) nor write into it, so we point the
variable at one temporary folder for the whole session; subprocesses inherit it. The synthetic data
is then generated once per test session and shared by all test files.

TMPDIR: what the launched programs leave in the temporary folder (torchrun's empty torchelastic_* folders, one
per run) goes into a private one, removed with the cache at the end of the session.

TRITON_DEFAULT_FP_FUSION: Triton 3.9 warns, once per process, when it is unset (its default becomes "off" in
3.10); we set Triton 3.9's default, so the kernels compile as they did, without the warning in every test run.
"""
import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so tests import data, metrics, kernels and the model scripts

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

if "SGG_ALIGN_TEST_KEEP_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sgg_align_test_cache_")
    os.environ["SGG_ALIGN_CACHE"] = _cache
    # The folder is ours alone (made just above), so removing it at exit deletes no user data.
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# This process's own temporary files (pytest's tmp_path included) stay where they were: tempfile reads TMPDIR once,
# at its first use (the mkdtemp just below at the latest). The programs the tests launch inherit the variable.
_tmp = tempfile.mkdtemp(prefix="sgg_align_test_tmp_")
os.environ["TMPDIR"] = _tmp
atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
