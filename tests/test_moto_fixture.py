import boto3


def test_moto_server_speaks_s3_over_http(aws_env):
    s3 = boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1")
    s3.create_bucket(Bucket="fixture-check")
    s3.put_object(Bucket="fixture-check", Key="k", Body=b"v")
    assert s3.get_object(Bucket="fixture-check", Key="k")["Body"].read() == b"v"
