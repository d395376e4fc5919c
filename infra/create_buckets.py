"""Create the S3 buckets SkyEye's services use, if missing: `mlflow` (the MLflow server's
artifacts), `dvc` (the DVC remote), `ray` (Ray's storage). Idempotent: a bucket that exists
is kept as it is. Runs once in infra/compose.yaml (the `buckets` job); works on any S3 API.

    python infra/create_buckets.py [BUCKET ...]

Reads the standard variables: AWS_ENDPOINT_URL (MinIO's URL; unset: AWS),
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Retries while the store is
still starting (up to --wait seconds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_BUCKETS = ("mlflow", "dvc", "ray")


def create_buckets(names: list[str] | tuple[str, ...], client=None, wait_s: float = 60) -> dict[str, str]:
    """{bucket: "created" | "exists"}; any other error of the store is raised."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    s3 = client or boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                                region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    outcome = {}
    for name in names:
        if name in existing:
            outcome[name] = "exists"
            continue
        try:
            s3.create_bucket(Bucket=name)
            outcome[name] = "created"
        except ClientError as err:  # created meanwhile by someone else
            if err.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            outcome[name] = "exists"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create SkyEye's S3 buckets if missing.")
    parser.add_argument("buckets", nargs="*", default=list(DEFAULT_BUCKETS))
    parser.add_argument("--wait", type=float, default=60, help="seconds to wait for the store to answer")
    args = parser.parse_args(argv)
    for name, state in create_buckets(args.buckets, wait_s=args.wait).items():
        print(f"bucket {name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
