"""The test suite's own set-up: under pytest-xdist, a file's tests share one worker."""

import os

import pytest


def test_this_file_is_scheduled_as_one_group(request):
    """xdist appends a test's group to its id (``...::name@group``) when it schedules by
    group. Without the group, a file's tests spread over the workers and every worker
    builds the shared trained run and the module fixtures again (several minutes of CI):
    that happened with pytest 9.2 and xdist 3.8, where the id no longer took the suffix."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not running under pytest-xdist")
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not scheduled by group (--dist loadgroup)")
    assert request.node.nodeid.endswith("@test_suite_setup.py"), request.node.nodeid
