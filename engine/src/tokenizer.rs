//! The checkpoint's tokenizer (`tokenizer.json`, through the `tokenizers` crate) and chat
//! template (`tokenizer_config.json`'s `chat_template` or `chat_template.jinja`, rendered by
//! minijinja the way transformers renders it with Jinja2).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// Tokenizer plus chat template of a checkpoint.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// The file the chat template came from (`chat_template.jinja` or `tokenizer_config.json`).
    template_path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Opens `tokenizer.json` (required) and `tokenizer_config.json` / `chat_template.jinja`
    /// (optional) in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(EngineError::MissingFile {
                path,
                what: "the tokenizer (tokenizer.json), needed to turn text into token ids",
            });
        }
        // The tokenizers crate panics on some malformed files (a `decoder` of an unexpected
        // shape: found by fuzzing, tests/fuzz.rs): its panic becomes this file's error.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_file(&path));
        std::panic::set_hook(hook);
        let inner = match parsed {
            Ok(r) => r.map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                message: e.to_string().replace('\n', " "),
            })?,
            Err(_) => {
                return Err(EngineError::Tokenizer {
                    path: path.clone(),
                    message: "not a tokenizer the tokenizers library can read (it gave up on a malformed part of the file)".into(),
                });
            }
        };
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| EngineError::Json {
                path: config_path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(EngineError::io(&config_path, e)),
        };
        let jinja_path = dir.join("chat_template.jinja");
        let template_path = if jinja_path.exists() {
            jinja_path.clone()
        } else {
            config_path.clone()
        };
        let chat_template = if jinja_path.exists() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| EngineError::io(&jinja_path, e))?)
        } else {
            match config.get("chat_template") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|i| i.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                Some(_) => {
                    return Err(EngineError::field(
                        &config_path,
                        "chat_template",
                        "expected a string or a list of {name, template}",
                    ));
                }
            }
        };
        Ok(Self {
            inner,
            chat_template,
            template_path,
            bos_token: token_string(config.get("bos_token")),
            eos_token: token_string(config.get("eos_token")),
            path,
        })
    }

    /// Token ids of `text`, with the tokenizer's own special tokens (as `tokenizer(text)` in
    /// transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`, choosing whether the post-processor adds special tokens.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EngineError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| EngineError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        })
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The path of `tokenizer.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The eos token string of tokenizer_config.json.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Whether the checkpoint has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template (`apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`).
    pub fn render_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template_err = |message: String| EngineError::ChatTemplate {
            path: self.template_path.clone(),
            message,
        };
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| template_err("this checkpoint has no chat template; use --prompt".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        let tmpl = env
            .template_from_str(source)
            .map_err(|e| template_err(format!("does not parse: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            tools => Option::<Vec<String>>::None,
        })
        .map_err(|e| template_err(format!("rendering failed: {e}")))
    }

    /// Token ids of a chat: the template rendered, then encoded without adding special tokens
    /// (as `apply_chat_template(..., tokenize=True)` does).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, true)?;
        self.encode_with(&text, false)
    }
}

/// Turns generated ids into text pieces as they arrive, holding back incomplete UTF-8.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    /// Adds one token; returns the new text that is now complete, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.printed || !text.is_char_boundary(self.printed) {
            return Ok(None);
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(piece))
    }
}
