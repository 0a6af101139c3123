//! The OpenAI chat request as it arrives over HTTP (`crate::http` turns it into a `ChatRequest`).
//!
//! Lists are read with their bounds as they are read: `stop` and a message's content parts were
//! untagged enums, which serde buffers whole before trying each form, and `messages` was read to
//! its end before `validate.rs` counted it. A body within the size limit holding millions of tiny
//! entries then cost a few hundred MiB per request before it was refused.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::validate::{MAX_MESSAGES, MAX_STOP_SEQUENCES};

/// Content parts of one message (text parts are joined; others are refused by the adapter).
const MAX_CONTENT_PARTS: usize = 1_000;

#[derive(Deserialize)]
pub(crate) struct OaiRequest {
    #[serde(default)]
    pub model: String,
    #[serde(deserialize_with = "messages")]
    pub messages: Vec<OaiMessage>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    /// `null` is "not set", as OpenAI's schema allows.
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub n: Option<u32>,
}

#[derive(Deserialize)]
pub(crate) struct OaiMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentField>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A message's content: a string, or a list of parts.
pub(crate) enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// `stop`: one string or a list of them (at most [`MAX_STOP_SEQUENCES`]).
pub(crate) struct StopField(pub Vec<String>);

/// The elements of a list, refusing it once it holds more than `max` (before reading the rest).
fn bounded<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(
    mut seq: A,
    max: usize,
    what: &str,
) -> Result<Vec<T>, A::Error> {
    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(max));
    while let Some(item) = seq.next_element()? {
        if out.len() == max {
            return Err(de::Error::custom(format!(
                "at most {max} {what} are allowed"
            )));
        }
        out.push(item);
    }
    Ok(out)
}

fn messages<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OaiMessage>, D::Error> {
    struct Messages;
    impl<'de> Visitor<'de> for Messages {
        type Value = Vec<OaiMessage>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of messages")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            bounded(seq, MAX_MESSAGES, "messages")
        }
    }
    d.deserialize_seq(Messages)
}

impl<'de> Deserialize<'de> for StopField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Stop;
        impl<'de> Visitor<'de> for Stop {
            type Value = StopField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StopField, E> {
                Ok(StopField(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<StopField, A::Error> {
                bounded(seq, MAX_STOP_SEQUENCES, "stop sequences").map(StopField)
            }
        }
        d.deserialize_any(Stop)
    }
}

impl<'de> Deserialize<'de> for ContentField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Content;
        impl<'de> Visitor<'de> for Content {
            type Value = ContentField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ContentField, E> {
                Ok(ContentField::Text(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<ContentField, E> {
                Ok(ContentField::Text(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ContentField, A::Error> {
                bounded(seq, MAX_CONTENT_PARTS, "content parts").map(ContentField::Parts)
            }
        }
        d.deserialize_any(Content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_refused_as_soon_as_they_pass_their_bound() {
        let req = |extra: &str| {
            serde_json::from_str::<OaiRequest>(&format!(
                r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
        };
        let ok = req(r#","stop":["a","b"],"stream":null"#).expect("two stops, stream null");
        assert_eq!(ok.stop.map(|s| s.0.len()), Some(2));
        assert_eq!(ok.stream, None);
        assert_eq!(
            req(r#","stop":"x""#).expect("one stop").stop.map(|s| s.0),
            Some(vec!["x".into()])
        );
        let many = format!(r#","stop":[{}]"#, vec![r#""""#; 1_000_000].join(","));
        let err = req(&many).err().expect("a million stops").to_string();
        assert!(err.contains("at most 4 stop sequences"), "{err}");
        let parts = serde_json::from_str::<OaiMessage>(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"text"}]}"#,
        )
        .expect("parts");
        assert!(matches!(parts.content, Some(ContentField::Parts(p)) if p.len() == 2));
        let messages = vec![r#"{"role":""}"#; MAX_MESSAGES + 1].join(",");
        let err = serde_json::from_str::<OaiRequest>(&format!(r#"{{"messages":[{messages}]}}"#))
            .err()
            .expect("too many messages")
            .to_string();
        assert!(err.contains("messages are allowed"), "{err}");
    }
}
