//! Chat templates: turning a conversation into the prompt text a chat model was trained on.
//!
//! A GGUF model carries a Jinja2 template under the metadata key `tokenizer.chat_template`; a
//! Hugging Face model carries the same language under `chat_template` in
//! `tokenizer_config.json`. [`ChatTemplate`] compiles such a template once with
//! [minijinja](https://docs.rs/minijinja) and renders it the way `transformers`'
//! `apply_chat_template` does:
//!
//! * the environment uses `trim_blocks` and `lstrip_blocks`, drops a single trailing newline,
//!   and allows `{% break %}` / `{% continue %}`;
//! * the context holds `messages` (a list of `{role, content}` maps), `add_generation_prompt`,
//!   `tools` and `documents` (both `none`), and `bos_token` / `eos_token` when they were given
//!   with [`ChatTemplate::with_special_tokens`];
//! * `raise_exception(msg)` fails the render with `msg`, `strftime_now(fmt)` formats the current
//!   time (UTC), and `tojson` accepts `ensure_ascii`, `indent`, `separators` and `sort_keys` and
//!   writes JSON like Python's `json.dumps` (no HTML escaping, `", "` and `": "` separators);
//! * Python string and dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...)
//!   work through minijinja-contrib's `pycompat`;
//! * the `{% generation %}` blocks HF uses to mark assistant tokens are accepted and render
//!   their body unchanged.
//!
//! ```
//! use kiln_transformer::chat::{ChatMessage, ChatTemplate};
//!
//! let template = ChatTemplate::chatml().with_special_tokens(Some("<s>".into()), None);
//! let prompt = template.render(&[ChatMessage::user("Hi")], true)?;
//! assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! assert_eq!(template.end_of_turn().as_deref(), Some("<|im_end|>"));
//! # Ok::<(), kiln_transformer::chat::ChatTemplateError>(())
//! ```

mod python;

use std::borrow::Cow;
use std::fmt;

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind};

use python::{strftime_now, tojson};

/// The name the template is registered under inside its minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation: who said it (`system`, `user`, `assistant`, ...) and what.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// The speaker: `system`, `user`, `assistant`, or whatever else the template knows.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with an arbitrary role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template source is not valid Jinja (or uses syntax minijinja does not support).
    #[error("invalid chat template: {0}")]
    Syntax(String),
    /// Rendering failed: the template called `raise_exception` (the message is passed through
    /// verbatim), or it hit a runtime error such as an undefined attribute or a type mismatch.
    #[error("chat template failed: {0}")]
    Render(String),
    /// [`ChatTemplate::render`] was given no messages.
    #[error("no messages to render")]
    Empty,
}

/// A compiled chat template: compile once with [`ChatTemplate::new`], render many times.
///
/// It is `Send + Sync` and cheap to share behind an `Arc`.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The standard ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), as used by
    /// [`ChatTemplate::chatml`].
    pub const CHATML: &'static str = "{% for message in messages %}\
        {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
        {% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    /// Compiles a Jinja2 chat template.
    ///
    /// Fails with [`ChatTemplateError::Syntax`] when the source does not parse.
    pub fn new(source: &str) -> Result<Self, ChatTemplateError> {
        let mut env = environment();
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source).into_owned())
            .map_err(|err| ChatTemplateError::Syntax(err.to_string()))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: None,
            eos_token: None,
        })
    }

    /// The standard ChatML template, for models that ship without one.
    pub fn chatml() -> Self {
        Self::new(Self::CHATML).expect("the built-in ChatML template compiles")
    }

    /// Sets the `bos_token` and `eos_token` template variables (usually the tokenizer's BOS and
    /// EOS token text). A `None` token is left undefined, as HF does for a tokenizer without it,
    /// so `{{ bos_token }}` renders as nothing and `bos_token is defined` is false.
    #[must_use]
    pub fn with_special_tokens(
        mut self,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        self.bos_token = bos_token;
        self.eos_token = eos_token;
        self
    }

    /// The template source this was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` appends the assistant header so the model
    /// answers next.
    ///
    /// Fails with [`ChatTemplateError::Empty`] for an empty conversation and with
    /// [`ChatTemplateError::Render`] when the template raises or hits a runtime error.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        if messages.is_empty() {
            return Err(ChatTemplateError::Empty);
        }
        let mut context = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        let context: Value = context.into_iter().collect();
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(render_error)
    }

    /// The strings that end an assistant turn in this template (e.g. `"<|im_end|>"` for ChatML),
    /// found by rendering a probe conversation; used as stop strings. Best effort; may be empty.
    ///
    /// The probe renders `[user, assistant]` (then `[system, user, assistant]` for templates that
    /// insist on a system message) and takes the first whitespace-separated piece after the
    /// assistant's reply. When nothing follows the reply, it renders one more user turn and takes
    /// what separates the reply from that turn's header. Each call renders afresh; cache the
    /// result if you need it often. Templates that close a turn with `eos_token` need
    /// [`ChatTemplate::with_special_tokens`] for this to find it.
    pub fn end_of_turn(&self) -> Option<String> {
        const SYSTEM: &str = "kiln-probe-system-prompt";
        const USER: &str = "kiln-probe-user-message";
        const ASSISTANT: &str = "kiln-probe-assistant-reply";
        const NEXT_USER: &str = "kiln-probe-next-user-message";

        let probes = [
            vec![ChatMessage::user(USER), ChatMessage::assistant(ASSISTANT)],
            vec![
                ChatMessage::system(SYSTEM),
                ChatMessage::user(USER),
                ChatMessage::assistant(ASSISTANT),
            ],
        ];
        for probe in probes {
            let Ok(text) = self.render(&probe, false) else {
                continue;
            };
            let Some(reply) = text.rfind(ASSISTANT) else {
                continue;
            };
            if let Some(piece) = first_piece(&text[reply + ASSISTANT.len()..]) {
                return Some(piece.to_owned());
            }

            // Nothing after the final reply: look at what separates it from a following turn,
            // minus the header that also precedes the first user message.
            let mut longer = probe;
            longer.push(ChatMessage::user(NEXT_USER));
            let Ok(longer_text) = self.render(&longer, false) else {
                return None;
            };
            let (Some(reply), Some(next), Some(first)) = (
                longer_text.rfind(ASSISTANT),
                longer_text.rfind(NEXT_USER),
                text.find(USER),
            ) else {
                return None;
            };
            let between = longer_text.get(reply + ASSISTANT.len()..next)?;
            let header = &text[..first];
            let shared = common_suffix_len(between, header);
            return first_piece(&between[..between.len() - shared]).map(str::to_owned);
        }
        None
    }
}

/// The minijinja environment HF's `apply_chat_template` corresponds to.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// Rewrites HF's `{% generation %}` / `{% endgeneration %}` tags (which only mark assistant
/// tokens) into `{% if true %}` / `{% endif %}`, which render the same text with the same
/// whitespace handling. Everything else, including expressions, comments and `{% raw %}`
/// blocks, is left byte for byte.
fn rewrite_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut in_raw = false;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let close = match after.as_bytes().first() {
            Some(b'%') => "%}",
            Some(b'{') if !in_raw => "}}",
            Some(b'#') if !in_raw => "#}",
            _ => {
                out.push_str(&rest[..=start]);
                rest = after;
                continue;
            }
        };
        let after = &after[1..];
        let end = if in_raw || close == "#}" {
            after.find(close)
        } else {
            find_tag_end(after, close)
        };
        let Some(end) = end else {
            break;
        };
        let tag = &rest[start..start + 2 + end + 2];
        let inner = &after[..end];
        out.push_str(&rest[..start]);
        rest = &after[end + 2..];
        let lead = if inner.starts_with(['-', '+']) {
            &inner[..1]
        } else {
            ""
        };
        let body = &inner[lead.len()..];
        let trail = if body.ends_with(['-', '+']) {
            &body[body.len() - 1..]
        } else {
            ""
        };
        let word = body[..body.len() - trail.len()].trim();
        let keyword = match word {
            _ if close != "%}" => None,
            "endraw" => {
                in_raw = false;
                None
            }
            _ if in_raw => None,
            "raw" => {
                in_raw = true;
                None
            }
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match keyword {
            Some(keyword) => {
                out.push_str("{%");
                out.push_str(lead);
                out.push(' ');
                out.push_str(keyword);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(tag),
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The offset of `close` in `text`, skipping over quoted strings (`'...'`, `"..."`, with
/// backslash escapes) as the Jinja lexer does inside a tag.
fn find_tag_end(text: &str, close: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut quote = None;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(_) if byte == b'\\' => index += 1,
            Some(q) if byte == q => quote = None,
            Some(_) => {}
            None if byte == b'\'' || byte == b'"' => quote = Some(byte),
            None if bytes[index..].starts_with(close.as_bytes()) => return Some(index),
            None => {}
        }
        index += 1;
    }
    None
}

/// A message raised by the template through `raise_exception`, kept as the error's source so
/// that [`render_error`] can report it verbatim.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// `raise_exception(message)`: fails the render with `message`.
fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = match message.as_str() {
        Some(text) => text.to_owned(),
        None => message.to_string(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// Converts a render failure, passing a `raise_exception` message through unchanged.
fn render_error(err: Error) -> ChatTemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = cause {
        if let Some(raised) = current.downcast_ref::<RaisedException>() {
            return ChatTemplateError::Render(raised.0.clone());
        }
        cause = current.source();
    }
    ChatTemplateError::Render(err.to_string())
}

/// The first whitespace-separated piece of `text`, if any.
fn first_piece(text: &str) -> Option<&str> {
    text.split_whitespace().next()
}

/// The length in bytes of the longest common suffix of `a` and `b`, on a char boundary.
fn common_suffix_len(a: &str, b: &str) -> usize {
    a.chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x.len_utf8())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct (from its GGUF file).
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Meta-Llama-3-8B-Instruct's template.
    const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("You are helpful."),
            ChatMessage::user("Hi"),
        ]
    }

    #[test]
    fn smollm2_with_system_prompt() {
        let template = ChatTemplate::new(SMOLLM2_TEMPLATE).unwrap();
        assert_eq!(
            template.render(&conversation(), true).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_inserts_default_system_prompt() {
        let template = ChatTemplate::new(SMOLLM2_TEMPLATE).unwrap();
        assert_eq!(
            template.render(&[ChatMessage::user("Hi")], true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template
                .render(
                    &[ChatMessage::user("Hi"), ChatMessage::assistant("Hello!")],
                    false
                )
                .unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(template.end_of_turn().as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn chatml_renders_standard_chatml() {
        let template = ChatTemplate::chatml();
        assert_eq!(template.source(), ChatTemplate::CHATML);
        assert_eq!(
            template.render(&conversation(), true).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template.render(&[ChatMessage::user("Hi")], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chatml_end_of_turn() {
        assert_eq!(
            ChatTemplate::chatml().end_of_turn().as_deref(),
            Some("<|im_end|>")
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        for source in [
            "{% for message in messages %}{{ message.content }}",
            "{{ 1 + }}",
            "{% bogus %}",
        ] {
            let err = ChatTemplate::new(source).unwrap_err();
            assert!(
                matches!(err, ChatTemplateError::Syntax(_)),
                "{source}: {err:?}"
            );
        }
    }

    #[test]
    fn raise_exception_becomes_render_error() {
        let template = ChatTemplate::new(
            "{% for message in messages %}{% if message['role'] == 'system' %}\
             {{ raise_exception('System role not supported') }}{% endif %}\
             {{ message['content'] }}{% endfor %}",
        )
        .unwrap();
        match template.render(&conversation(), false) {
            Err(ChatTemplateError::Render(message)) => {
                assert_eq!(message, "System role not supported");
            }
            other => panic!("expected a render error, got {other:?}"),
        }
        assert_eq!(
            template.render(&[ChatMessage::user("Hi")], false).unwrap(),
            "Hi"
        );
    }

    #[test]
    fn runtime_error_is_render_error() {
        let template = ChatTemplate::new("{{ messages[0].content.nope.deeper }}").unwrap();
        let err = template.render(&conversation(), false).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
    }

    #[test]
    fn empty_messages_are_rejected() {
        let err = ChatTemplate::chatml().render(&[], true).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Empty));
    }

    #[test]
    fn llama3_template_uses_bos_token() {
        let template = ChatTemplate::new(LLAMA3_TEMPLATE)
            .unwrap()
            .with_special_tokens(
                Some("<|begin_of_text|>".to_owned()),
                Some("<|eot_id|>".to_owned()),
            );
        let messages = [
            ChatMessage::system("  You are helpful.\n"),
            ChatMessage::user("Hi"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(template.end_of_turn().as_deref(), Some("<|eot_id|>"));
    }

    #[test]
    fn missing_special_tokens_are_undefined() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% if eos_token is defined %}eos{% else %}no eos{% endif %}",
        )
        .unwrap();
        assert_eq!(template.render(&conversation(), false).unwrap(), "no eos");
        let template =
            template.with_special_tokens(Some("<s>".to_owned()), Some("</s>".to_owned()));
        assert_eq!(template.render(&conversation(), false).unwrap(), "<s>eos");
    }

    #[test]
    fn unicode_passes_through() {
        let text = "héllo wörld — 你好，世界 🦀 \u{200d} مرحبا";
        let rendered = ChatTemplate::chatml()
            .render(&[ChatMessage::user(text)], false)
            .unwrap();
        assert_eq!(rendered, format!("<|im_start|>user\n{text}<|im_end|>\n"));
    }

    /// Checked against Python jinja2 (`trim_blocks=True, lstrip_blocks=True`).
    #[test]
    fn whitespace_control_matches_jinja2() {
        let source = "{% for message in messages %}\n    {% if message.role == 'system' %}\n<<SYS>>{{ message.content.strip() }}<</SYS>>\n    {% else %}\n[{{ message.role | upper }}] {{ message.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n[ASSISTANT]\n{% endif %}\n";
        let template = ChatTemplate::new(source).unwrap();
        let messages = [
            ChatMessage::system("  Be brief.  "),
            ChatMessage::user("Hi"),
        ];
        assert_eq!(
            template.render(&messages, true).unwrap(),
            "<<SYS>>Be brief.<</SYS>>\n[USER] Hi\n[ASSISTANT]\n"
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let source = "{%- set ns = namespace(n=0) -%}\
            {%- for message in messages -%}\
            {%- if message.content.startswith('stop') %}{% break %}{% endif -%}\
            {{ message.content.split(',') | join('|') }};\
            {%- set ns.n = ns.n + 1 -%}\
            {%- endfor -%}\
            {{ ns.n }}";
        let template = ChatTemplate::new(source).unwrap();
        let messages = [
            ChatMessage::user("a,b"),
            ChatMessage::assistant("c"),
            ChatMessage::user("stop here"),
            ChatMessage::assistant("never"),
        ];
        assert_eq!(template.render(&messages, false).unwrap(), "a|b;c;2");
    }

    /// Expected strings are Python's `json.dumps` with the same arguments.
    #[test]
    fn tojson_matches_python_json_dumps() {
        let template = ChatTemplate::new(
            "{% set x = {'name': 'f', 'args': {'x': 1, 'y': [1.5, true, none, 'é<>\"\\n'], 'z': {}}} %}\
             {{ x | tojson }}\n{{ x | tojson(indent=2) }}\n{{ x | tojson(sort_keys=true, ensure_ascii=true) }}\n\
             {{ messages[0] | tojson(separators=[',', ':']) }}\n{{ [1e-7, 1e16, 2.0, 0.25] | tojson }}",
        )
        .unwrap();
        let expected = concat!(
            r#"{"name": "f", "args": {"x": 1, "y": [1.5, true, null, "é<>\"\n"], "z": {}}}"#,
            "\n",
            "{\n  \"name\": \"f\",\n  \"args\": {\n    \"x\": 1,\n    \"y\": [\n      1.5,\n      true,\n      null,\n      \"\u{e9}<>\\\"\\n\"\n    ],\n    \"z\": {}\n  }\n}",
            "\n",
            r#"{"args": {"x": 1, "y": [1.5, true, null, "\u00e9<>\"\n"], "z": {}}, "name": "f"}"#,
            "\n",
            r#"{"role":"system","content":"You are helpful."}"#,
            "\n",
            "[1e-07, 1e+16, 2.0, 0.25]",
        );
        assert_eq!(template.render(&conversation(), false).unwrap(), expected);
    }

    #[test]
    fn tools_and_documents_are_none() {
        let template = ChatTemplate::new(
            "{% if tools is not none %}tools{% endif %}{% if documents is none %}no documents{% endif %}",
        )
        .unwrap();
        assert_eq!(
            template.render(&conversation(), false).unwrap(),
            "no documents"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for message in messages %}{% if message.role == 'assistant' %}\n{% generation %}\n{{ message.content }}!\n{%- endgeneration %}\n{% else %}{{ message.content }}|{% endif %}{% endfor %}";
        let template = ChatTemplate::new(source).unwrap();
        assert_eq!(template.source(), source);
        let messages = [ChatMessage::user("Hi"), ChatMessage::assistant("Hello")];
        assert_eq!(template.render(&messages, false).unwrap(), "Hi|Hello!");
    }

    #[test]
    fn generation_text_outside_tags_is_untouched() {
        let source = "{# {% generation %} isn't a tag here #}{{ '{% generation %}' }}|\
            {% raw %}{% generation %}{% endraw %}|{% set x = '%}' %}{% generation %}{{ x }}{% endgeneration %}";
        assert_eq!(
            ChatTemplate::new(source)
                .unwrap()
                .render(&conversation(), false)
                .unwrap(),
            "{% generation %}|{% generation %}|%}"
        );
    }

    #[test]
    fn end_of_turn_falls_back_to_the_turn_separator() {
        // Closes a turn only when another one follows.
        let template = ChatTemplate::new(
            "{% for message in messages %}{% if not loop.first %}<sep>\n{% endif %}\
             <{{ message.role }}>{{ message.content }}{% endfor %}",
        )
        .unwrap();
        assert_eq!(template.end_of_turn().as_deref(), Some("<sep>"));
        // Nothing marks the end of a turn at all.
        let template =
            ChatTemplate::new("{% for message in messages %}{{ message.content }}{% endfor %}")
                .unwrap();
        assert_eq!(template.end_of_turn(), None);
        // A template that rejects every conversation.
        let template = ChatTemplate::new("{{ raise_exception('nope') }}").unwrap();
        assert_eq!(template.end_of_turn(), None);
    }

    #[test]
    fn strftime_now_is_available() {
        let template = ChatTemplate::new("{{ strftime_now('%Y') | length }}").unwrap();
        assert_eq!(template.render(&conversation(), false).unwrap(), "4");
    }

    #[test]
    fn is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<ChatTemplate>();
    }
}
