//! S3 settings from the standard AWS environment variables, and `s3.*` options overriding them.
//! (Its own test binary: it changes the process environment.)

#[path = "common/moto.rs"]
mod moto;

use weir_storage::{CheckpointStorage, StorageError};

#[test]
fn the_environment_fills_in_and_options_override_it() {
    let m = moto::Moto::start("weir-env");
    let dead = "http://127.0.0.1:1";
    // Everything from the environment; an http:// endpoint needs no AWS_ALLOW_HTTP.
    std::env::set_var("AWS_ENDPOINT_URL", m.endpoint());
    std::env::set_var("AWS_ACCESS_KEY_ID", "env-key");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "env-secret");
    std::env::set_var("AWS_REGION", "eu-west-1");
    let s = CheckpointStorage::open_with(&m.url("env"), "job", &[]).unwrap();
    s.put("chk-1/a", b"from env".to_vec()).unwrap();
    assert_eq!(&s.read("chk-1/a").unwrap()[..], b"from env");

    // The environment points elsewhere (both the generic and the S3-specific endpoint): the
    // options win.
    std::env::set_var("AWS_ENDPOINT_URL", dead);
    std::env::set_var("AWS_ENDPOINT_URL_S3", dead);
    let s = CheckpointStorage::open_with(&m.url("env"), "job", &m.options()).unwrap();
    assert_eq!(&s.read("chk-1/a").unwrap()[..], b"from env");
    let (r, id) = CheckpointStorage::open_checkpoint_path_with(&s.location().join("chk-1").display().to_string(), &m.options()).unwrap();
    assert_eq!((id, &r.read("chk-1/a").unwrap()[..]), (1, &b"from env"[..]));

    // Without options the dead endpoint is used: an I/O error naming the file.
    let s = CheckpointStorage::open_with(&m.url("env"), "job", &[]).unwrap();
    let e = s.read("chk-1/a").unwrap_err();
    assert!(matches!(e, StorageError::Io { .. }) && !e.is_corruption(), "{e}");
    assert!(e.to_string().contains("s3://weir-env/env/job/chk-1/a"), "{e}");
}
