//! Arbitrary bytes as a chat or embeddings request body, checked the way the client API checks
//! it (`tollgate::api::client::check_request_body`) and then counted for the input hold: no
//! panic; every rejection is a 400; every acceptance satisfies R25.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::api::client::check_request_body;
use tollgate::config::Endpoint;
use tollgate::metering::tokenizer::{Tokenizer, TokenizerKind};

fn tokenizers() -> &'static [Tokenizer] {
    static T: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        [TokenizerKind::Chunks, TokenizerKind::O200kBase]
            .into_iter()
            .map(|k| Tokenizer::new(k).expect("tokenizer"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    for endpoint in [
        Endpoint::Chat,
        Endpoint::Embeddings,
        Endpoint::Responses,
        Endpoint::Messages,
    ] {
        match check_request_body(data, endpoint) {
            Err(e) => assert_eq!(e.status.as_u16(), 400, "{e:?}"),
            Ok(c) => {
                assert!(!c.model.is_empty());
                assert!(c.n >= 1);
                assert!(c.max_tokens.is_none_or(|m| m >= 1));
                assert!(!c.include_usage || c.stream);
                if endpoint == Endpoint::Embeddings {
                    assert!(!c.stream);
                }
                for t in tokenizers() {
                    let n = match endpoint {
                        Endpoint::Chat => {
                            t.chat_input_tokens(c.body.get("messages").unwrap_or(&Value::Null))
                        }
                        Endpoint::Embeddings => {
                            t.embeddings_input_tokens(c.body.get("input").unwrap_or(&Value::Null))
                        }
                        Endpoint::Responses => {
                            t.agent_input_tokens(c.body.get("instructions"), c.body.get("input"))
                        }
                        Endpoint::Messages => {
                            t.agent_input_tokens(c.body.get("system"), c.body.get("messages"))
                        }
                    };
                    if t.kind() == TokenizerKind::Chunks && endpoint == Endpoint::Chat {
                        assert!(n >= 1, "chunks counts at least one input token (R5)");
                    }
                }
            }
        }
    }
});
