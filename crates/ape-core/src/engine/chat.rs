//! Chat prompts: the model's own Jinja chat template (`tokenizer.chat_template`)
//! rendered with minijinja, set up the way Hugging Face `transformers` renders it.

use std::io;

use minijinja::value::{from_args, Kwargs, ValueKind};
use minijinja::{context, Environment, ErrorKind, State, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::gguf::{self, Gguf};

const TEMPLATE_KEY: &str = "tokenizer.chat_template";
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may know more, such as `tool`).
    pub role: String,
    /// What the turn says; the template puts the role's markers around it.
    pub content: String,
}

impl Message {
    /// A turn with any role, for those the shorthands below do not cover.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` turn: instructions that hold for the whole conversation.
    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    /// A `user` turn: what the model is asked.
    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    /// An `assistant` turn: what the model answered earlier in the conversation.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// A compiled chat template, ready to turn conversations into prompt text.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template stored in the model file; `None` if there is none (a base model,
    /// which is given plain text to continue, never a made-up chat layout).
    pub fn from_gguf(gguf: &Gguf) -> Result<Option<Self>> {
        let Some(value) = gguf.get(TEMPLATE_KEY) else {
            return Ok(None);
        };
        let source = value.as_str().ok_or_else(|| Error::Metadata {
            key: TEMPLATE_KEY.into(),
            expected: "string",
        })?;
        ChatTemplate::new(
            source,
            special_token_text(gguf, "tokenizer.ggml.bos_token_id"),
            special_token_text(gguf, "tokenizer.ggml.eos_token_id"),
        )
        .map(Some)
    }

    /// Compiles a template; `bos_token` and `eos_token` are the texts the template sees
    /// under those names.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders chat templates with both on; without them the block tags
        // of templates written without `{%-` leave stray newlines and indentation.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|e| Error::Template(format!("the template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let failed =
            |e: minijinja::Error| Error::Template(format!("cannot render the conversation: {e}"));
        self.env
            .get_template(TEMPLATE_NAME)
            .map_err(failed)?
            .render(context! {
                messages,
                add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(failed)
    }
}

/// The vocabulary text of the token whose id is stored under `id_key`; empty when the
/// file does not name one, which is what a template concatenating it can still use.
fn special_token_text(gguf: &Gguf, id_key: &str) -> String {
    gguf.get(id_key)
        .and_then(gguf::Value::as_u64)
        .zip(
            gguf.get("tokenizer.ggml.tokens")
                .and_then(gguf::Value::as_strings),
        )
        .and_then(|(id, tokens)| tokens.get(usize::try_from(id).ok()?))
        .unwrap_or_default()
        .to_string()
}

/// Templates call this to reject conversations they cannot format.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: Python's `json.dumps` with non-ASCII text kept
/// as is, so `", "` and `": "` separators, or an indented layout when `indent` is given.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut json = Vec::new();
    let written = match indent {
        Some(width) => {
            let unit = vec![b' '; width];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&unit);
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut json, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut json,
            PythonSeparators,
        )),
    };
    written
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, format!("tojson: {e}")))?;
    let json = String::from_utf8(json).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(json))
}

/// serde_json's compact output with Python's default separators.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }
}

/// The Python `str` and `dict` methods that chat templates call, which minijinja does
/// not have. Most map onto minijinja's filters of the same meaning.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let as_filter = |filter: &str| {
        let filter_args: Vec<Value> = std::iter::once(value.clone())
            .chain(args.iter().cloned())
            .collect();
        state.apply_filter(filter, &filter_args)
    };
    if let Some(text) = value.as_str() {
        return match method {
            "strip" => as_filter("trim"),
            "upper" | "lower" | "title" | "capitalize" | "replace" | "split" => as_filter(method),
            "lstrip" | "rstrip" => {
                let (chars,): (Option<&str>,) = from_args(args)?;
                let stripped = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
                Ok(Value::from(if method == "lstrip" {
                    text.trim_start_matches(stripped)
                } else {
                    text.trim_end_matches(stripped)
                }))
            }
            "startswith" | "endswith" => {
                let (affix,): (&str,) = from_args(args)?;
                Ok(Value::from(if method == "startswith" {
                    text.starts_with(affix)
                } else {
                    text.ends_with(affix)
                }))
            }
            _ => Err(ErrorKind::UnknownMethod.into()),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => as_filter("items"),
            "keys" => Ok(value.try_iter()?.collect()),
            "values" => value.try_iter()?.map(|key| value.get_item(&key)).collect(),
            "get" => {
                let (key, default): (Value, Option<Value>) = from_args(args)?;
                let item = value.get_item(&key)?;
                Ok(if item.is_undefined() {
                    default.unwrap_or(Value::from(()))
                } else {
                    item
                })
            }
            _ => Err(ErrorKind::UnknownMethod.into()),
        };
    }
    Err(ErrorKind::UnknownMethod.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[Message]) -> Result<String> {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, false)
    }

    #[test]
    fn special_tokens_are_visible() {
        let out = render(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            &[Message::user("x")],
        );
        assert_eq!(out.unwrap(), "<s>x</s>");
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source =
            "{% for m in messages %}\n  {% if true %}\n[{{ m.role }}]\n  {% endif %}\n{% endfor %}";
        let out = render(source, &[Message::user("a"), Message::assistant("b")]);
        assert_eq!(out.unwrap(), "[user]\n[assistant]\n");
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let source = "{% if messages[0].role != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}";
        let err = render(source, &[Message::user("hi")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("a system message is required"), "{err}");
    }

    #[test]
    fn python_string_and_dict_methods() {
        let source = "{{ messages[0].content.strip() }}|{{ messages[0].content.lstrip() }}|\
                      {{ messages[0].content.rstrip(' !') }}|{{ messages[0].content.strip().startswith('hello') }}|\
                      {{ messages[0].content.endswith('! ') }}|{{ messages[0].content.split() | join(',') }}|\
                      {{ messages[0].content.strip().upper() }}|{{ messages[0].content.replace('world', 'there') }}|\
                      {% for k, v in messages[0].items() %}{{ k }}={{ v.strip() }};{% endfor %}|\
                      {{ messages[0].get('role') }}{{ messages[0].get('name', '-') }}";
        let out = render(source, &[Message::user(" hello world! ")]).unwrap();
        assert_eq!(
            out,
            "hello world!|hello world! | hello world|True|True|hello,world!|HELLO WORLD!| hello there! |\
             role=user;content=hello world!;|user-"
        );
    }

    #[test]
    fn tojson_uses_python_separators() {
        let source = "{{ {'a': [1, 2], 'b': 'é'} | tojson }}|{{ [1] | tojson(indent=2) }}";
        assert_eq!(
            render(source, &[]).unwrap(),
            "{\"a\": [1, 2], \"b\": \"é\"}|[\n  1\n]"
        );
    }

    #[test]
    fn undefined_tools_are_falsy() {
        let source = "{% if tools %}tools{% else %}none{% endif %}";
        assert_eq!(render(source, &[]).unwrap(), "none");
    }

    #[test]
    fn syntax_errors_are_reported_at_load() {
        let err = ChatTemplate::new("{% for %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("chat template: the template does not compile"),
            "{err}"
        );
    }
}
