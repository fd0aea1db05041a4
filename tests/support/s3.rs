//! S3 on moto's server (the same process as its KMS: [`super::kms::moto`]): a client and
//! buckets for tests. Credentials are moto's dummy ones, set in the environment so that the
//! code under test finds them through the default AWS chain too.

/// Sets moto's dummy credentials in the environment.
pub fn dummy_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
}

/// A path-style S3 client of the moto server at `url`.
pub async fn client(url: &str) -> aws_sdk_s3::Client {
    dummy_credentials();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(url)
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    )
}

/// Creates `bucket` on the moto server at `url`.
pub async fn create_bucket(url: &str, bucket: &str) -> aws_sdk_s3::Client {
    let c = client(url).await;
    c.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("CreateBucket");
    c
}
