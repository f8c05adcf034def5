"""Where Ray Train and Tune write: local folders, s3:// paths, and S3-compatible endpoints."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs
import pytest

from retrieval.errors import ConfigError
from retrieval.train.driver import storage_location


def test_local_and_plain_s3_paths_leave_the_filesystem_to_ray(make_job_spec, tmp_path: Path) -> None:
    local = make_job_spec(storage={"path": str(tmp_path / "runs")})
    assert storage_location(local) == (str(tmp_path / "runs"), None)
    s3 = make_job_spec(storage={"path": "s3://bucket/prefix"})
    assert storage_location(s3) == ("s3://bucket/prefix", None)


def test_custom_endpoint_gives_an_s3_filesystem_on_it(make_job_spec) -> None:
    spec = make_job_spec(storage={"path": "s3://bucket/prefix", "endpoint_url": "http://127.0.0.1:9000/"})
    assert spec.storage.endpoint_url == "http://127.0.0.1:9000"
    path, filesystem = storage_location(spec)
    assert path == "bucket/prefix"
    assert isinstance(filesystem, pyarrow.fs.S3FileSystem)
    # A sweep's trial storage under the same bucket goes through the same endpoint.
    assert storage_location(spec, "s3://bucket/prefix/sweep-trials")[0] == "bucket/prefix/sweep-trials"


def test_endpoint_with_credentials_is_refused_without_echoing_them(make_job_spec) -> None:
    with pytest.raises(ConfigError) as error:
        make_job_spec(storage={"path": "s3://bucket/x", "endpoint_url": "http://user:hunter2@minio:9000"})
    message = str(error.value)
    assert "no user or password" in message and "hunter2" not in message


def test_endpoint_needs_an_s3_path(make_job_spec) -> None:
    with pytest.raises(ConfigError, match="endpoint_url applies to an s3:// path"):
        make_job_spec(storage={"path": "ray_results", "endpoint_url": "http://minio:9000"})
