//! The OpenAI chat request as it arrives over HTTP (`crate::http` turns it into a `ChatRequest`).
//!
//! Lists are read with their bounds as they are read: `stop` and a message's content parts were
//! untagged enums, which serde buffers whole before trying each form, and `messages` was read to
//! its end before `validate.rs` counted it. A body within the size limit holding millions of tiny
//! entries then cost a few hundred MiB per request before it was refused.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::validate::{MAX_MESSAGES, MAX_STOP_SEQUENCES};

/// Content parts of one message (text parts are joined; others are refused by the adapter).
const MAX_CONTENT_PARTS: usize = 1_000;

// `expecting`: serde names the type in a body of the wrong shape, and its name is ours, not the
// client's.
#[derive(Deserialize)]
#[serde(expecting = "a JSON object (a chat completion request)")]
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
    /// Passed on (`ChatOptions::reasoning_effort`): dropping it gave a client that asked for
    /// `low` the upstream's default, more reasoning tokens and a larger bill.
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// Only the upstream's default tier is served: the router's price is set for it, `priority`
    /// costs the owner more and `flex` answers slower, so other tiers are refused (`http.rs`)
    /// rather than dropped.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Only the upstream's default (`medium`) is served: a `low` dropped on the way gave the
    /// longer default answer, charged per token; passing it on is not built (`http.rs`).
    #[serde(default)]
    pub verbosity: Option<String>,
    /// Options that change what an answer is (tool calls, JSON, log probabilities, audio): the
    /// router answers with text only, so a request asking for one is refused rather than
    /// answered (and charged) without it ([`OaiRequest::unsupported_option`]). Sampling hints
    /// (`seed`, penalties) are not among them. Fields, not a flattened struct: serde would
    /// buffer every unknown field whole to hand it to a flattened one.
    #[serde(default)]
    tools: Option<Asked>,
    #[serde(default)]
    tool_choice: Option<Asked>,
    #[serde(default)]
    functions: Option<Asked>,
    #[serde(default)]
    function_call: Option<Asked>,
    #[serde(default)]
    response_format: Option<Asked>,
    #[serde(default)]
    logprobs: Option<Asked>,
    #[serde(default)]
    top_logprobs: Option<Asked>,
    #[serde(default)]
    audio: Option<Asked>,
    /// A web search before the answer: billed to the owner apart, and an answer of another kind.
    #[serde(default)]
    web_search_options: Option<Asked>,
    /// `["text"]` asks for what every answer is; `["text", "audio"]` for more.
    #[serde(default)]
    modalities: Option<Modalities>,
}

impl OaiRequest {
    /// The first option that asks for an answer other than text, if any.
    pub fn unsupported_option(&self) -> Option<&'static str> {
        let asks = |option: &Option<Asked>| option.as_ref().is_some_and(|a| a.asks);
        let declines = |choice: &Option<Asked>| choice.as_ref().is_some_and(|c| c.none);
        // Tools offered with a choice of "none" ask for nothing (some SDKs always send theirs).
        let offered = !declines(&self.tool_choice) && !declines(&self.function_call);
        [
            ("tools", offered && asks(&self.tools)),
            ("tool_choice", asks(&self.tool_choice)),
            ("functions", offered && asks(&self.functions)),
            ("function_call", asks(&self.function_call)),
            ("response_format", asks(&self.response_format)),
            ("logprobs", asks(&self.logprobs)),
            ("top_logprobs", asks(&self.top_logprobs)),
            ("audio", asks(&self.audio)),
            ("web_search_options", asks(&self.web_search_options)),
            ("modalities", self.modalities.as_ref().is_some_and(|m| m.0)),
        ]
        .into_iter()
        .find_map(|(name, asked)| asked.then_some(name))
    }
}

/// Whether an option asks for something: `false`, `0`, `null`, `[]`, `""`, `"none"`, `"auto"`,
/// `"text"` and an object whose only key is `type` with one of those strings do not (they are
/// what a text answer already is); anything else does.
pub(crate) struct Asked {
    asks: bool,
    /// The string `"none"`: a tool choice that declines every tool.
    none: bool,
}

impl Asked {
    fn asks(asks: bool) -> Self {
        Asked { asks, none: false }
    }
}

/// `modalities`: whether it asks for more than text (`["text"]`, `[]` and `null` do not).
pub(crate) struct Modalities(bool);

impl<'de> Deserialize<'de> for Modalities {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // OpenAI knows two; a longer list is refused as it is read.
        let list: Vec<std::borrow::Cow<'de, str>> = bounded_list(d, 8, "modalities")?;
        Ok(Modalities(list.iter().any(|m| m != "text")))
    }
}

#[derive(Deserialize)]
#[serde(expecting = "a message object")]
pub(crate) struct OaiMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentField>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(expecting = "a JSON object (stream_options)")]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(expecting = "a content part object")]
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

/// A request's messages, at most [`MAX_MESSAGES`] (both HTTP fronts read theirs so).
pub(crate) fn messages<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    bounded_list(d, MAX_MESSAGES, "messages")
}

/// A JSON list of at most `max` `T`s (`null`: none), refused as soon as it holds more: a body of
/// millions of tiny entries (`[{}, {}, …]` within the 8 MiB body limit) must not be read into
/// memory before validation counts them. For `deserialize_with`.
pub(crate) fn bounded_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    struct List<T> {
        max: usize,
        what: &'static str,
        item: std::marker::PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for List<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {} {}", self.max, self.what)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            bounded(seq, self.max, self.what)
        }
    }
    d.deserialize_any(List {
        max,
        what,
        item: std::marker::PhantomData,
    })
}

/// Reads "a string or a list" (`stop`, a message's content) as it streams: `text` makes the value
/// of a string, `list` that of a list of at most `max` `T`s (`what` names them in the refusal).
struct StringOrList<T, V> {
    expecting: &'static str,
    text: fn(String) -> V,
    list: fn(Vec<T>) -> V,
    max: usize,
    what: &'static str,
}

impl<'de, T: Deserialize<'de>, V> Visitor<'de> for StringOrList<T, V> {
    type Value = V;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<V, E> {
        Ok((self.text)(s.to_string()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<V, E> {
        Ok((self.text)(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V, A::Error> {
        bounded(seq, self.max, self.what).map(self.list)
    }
}

impl<'de> Deserialize<'de> for StopField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringOrList {
            expecting: "a string or a list of strings",
            text: |s| StopField(vec![s]),
            list: StopField,
            max: MAX_STOP_SEQUENCES,
            what: "stop sequences",
        })
    }
}

impl<'de> Deserialize<'de> for ContentField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringOrList {
            expecting: "a string or a list of content parts",
            text: ContentField::Text,
            list: ContentField::Parts,
            max: MAX_CONTENT_PARTS,
            what: "content parts",
        })
    }
}

impl<'de> Deserialize<'de> for Asked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AskedVisitor;
        impl<'de> Visitor<'de> for AskedVisitor {
            type Value = Asked;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an option's value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Asked, E> {
                Ok(Asked::asks(false))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Asked, E> {
                Ok(Asked::asks(b))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Asked, E> {
                Ok(Asked::asks(n != 0))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Asked, E> {
                Ok(Asked::asks(n != 0))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Asked, E> {
                Ok(Asked::asks(n != 0.0))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Asked, E> {
                Ok(Asked {
                    asks: !matches!(s, "" | "none" | "auto" | "text"),
                    none: s == "none",
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Asked, A::Error> {
                // Elements are skipped, not kept: a long list costs no memory.
                let mut any = false;
                while seq.next_element::<de::IgnoredAny>()?.is_some() {
                    any = true;
                }
                Ok(Asked::asks(any))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Asked, A::Error> {
                let mut text_only = false;
                let mut other = false;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "type" {
                        let kind = map.next_value::<Asked>()?;
                        text_only = !kind.asks;
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                        other = true;
                    }
                }
                Ok(Asked::asks(other || !text_only))
            }
        }
        d.deserialize_any(AskedVisitor)
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

    #[test]
    fn strings_or_lists_say_what_they_expect() {
        let err = |json: &str| {
            serde_json::from_str::<OaiMessage>(json)
                .err()
                .expect("refused")
                .to_string()
        };
        let e = err(r#"{"role":"user","content":7}"#);
        assert!(
            e.contains("expected a string or a list of content parts"),
            "{e}"
        );
        let parts = vec![r#"{"type":"text"}"#; MAX_CONTENT_PARTS + 1].join(",");
        let e = err(&format!(r#"{{"role":"user","content":[{parts}]}}"#));
        assert!(e.contains("at most 1000 content parts are allowed"), "{e}");
        let e = serde_json::from_str::<StopField>("7")
            .err()
            .expect("refused");
        assert!(
            e.to_string()
                .contains("expected a string or a list of strings"),
            "{e}"
        );
        let text = serde_json::from_str::<ContentField>(r#""hi""#).expect("text");
        assert!(matches!(text, ContentField::Text(t) if t == "hi"));
    }

    #[test]
    fn options_asking_for_more_than_text_are_told_apart() {
        let option = |extra: &str| {
            serde_json::from_str::<OaiRequest>(&format!(
                r#"{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
            ))
            .expect("request")
            .unsupported_option()
        };
        // What a text answer already is, as SDKs send by default.
        let harmless = r#","tools":[],"tool_choice":"none","function_call":"auto","response_format":{"type":"text"},"logprobs":false,"top_logprobs":0,"audio":null,"seed":7,"presence_penalty":0"#;
        assert_eq!(option(harmless), None);
        assert_eq!(option(r#","tools":[{"type":"function"}]"#), Some("tools"));
        let declined = r#","tools":[{"type":"function"}],"tool_choice":"none""#;
        assert_eq!(option(declined), None);
        assert_eq!(option(r#","tool_choice":"required""#), Some("tool_choice"));
        assert_eq!(
            option(r#","tool_choice":{"type":"function","function":{"name":"f"}}"#),
            Some("tool_choice")
        );
        assert_eq!(option(r#","functions":[{"name":"f"}]"#), Some("functions"));
        assert_eq!(
            option(r#","response_format":{"type":"json_schema","json_schema":{}}"#),
            Some("response_format")
        );
        assert_eq!(option(r#","logprobs":true"#), Some("logprobs"));
        assert_eq!(option(r#","top_logprobs":3"#), Some("top_logprobs"));
        assert_eq!(option(r#","audio":{"voice":"alloy"}"#), Some("audio"));
        assert_eq!(option(r#","modalities":["text"]"#), None);
        assert_eq!(option(r#","modalities":null"#), None);
        assert_eq!(
            option(r#","tools":["text"]"#),
            Some("tools"),
            "any tool asks"
        );
        assert_eq!(
            option(r#","modalities":["text","audio"]"#),
            Some("modalities")
        );
        // A long list is read without keeping it.
        let many = format!(r#","tools":[{}]"#, vec!["{}"; 100_000].join(","));
        assert_eq!(option(&many), Some("tools"));
    }
}
