"""A job whose user code is broken ends FAILED with a one-line reason that names the field."""

from __future__ import annotations

import pytest

from gradhub.client.client import Client
from gradhub.proto.contract.errors import JobFailedError


def test_missing_model_factory_fails_the_job_with_a_clear_reason(server):
    with Client(server.address) as client:
        job = client.submit({"name": "broken", "workers": 2, "resources": {"cpus": 0.5},
                             "model": {"factory": "no_such_package.models:build"}, "dataset": "digits",
                             "steps": 5})
        with pytest.raises(JobFailedError, match="model.factory"):
            job.wait(timeout=120)
        info = client.get_job(job.id)
    assert info.state == "FAILED"
    assert "no_such_package" in info.reason and "Traceback" not in info.reason and "\n" not in info.reason
