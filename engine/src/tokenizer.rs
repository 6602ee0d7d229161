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

    /// The tokenizer a GGUF file carries (`tokenizer.ggml.*`): a byte-level BPE vocabulary
    /// (`gpt2`) with its merges, token types (control and user-defined tokens are added
    /// tokens, matched before the pre-tokenizer splits), `bos`/`eos` ids, `add_bos_token`, and
    /// the pre-tokenizer `tokenizer.ggml.pre` names; the chat template is
    /// `tokenizer.chat_template`. Built as a `tokenizers` tokenizer, as llama.cpp builds its
    /// own from the same keys.
    pub fn from_gguf(f: &crate::gguf::GgufFile) -> Result<Self> {
        use crate::gguf::Value as G;
        let path = f.path.clone();
        let bad = |key: &str, m: String| EngineError::field(&path, key, m);
        let strings = |key: &str| -> Result<Option<Vec<String>>> {
            match f.get(key) {
                None => Ok(None),
                Some(G::Array(_, items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or_else(|| bad(key, "expected an array of strings".into())),
                Some(v) => Err(bad(
                    key,
                    format!("expected an array of strings, found {}", v.type_name()),
                )),
            }
        };
        let model = f.get("tokenizer.ggml.model").and_then(G::as_str);
        if model != Some("gpt2") {
            return Err(bad(
                "tokenizer.ggml.model",
                format!(
                    "{model:?}: only byte-level BPE vocabularies (`gpt2`) are read from GGUF files; give --tokenizer DIR with the checkpoint's tokenizer.json"
                ),
            ));
        }
        let tokens = strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad("tokenizer.ggml.tokens", "missing".into()))?;
        let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let types: Vec<i64> = match f.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(G::Array(_, items)) if items.len() == tokens.len() => items
                .iter()
                .map(|v| match v {
                    G::I32(t) => Some(i64::from(*t)),
                    other => other.as_u64().map(|t| t as i64),
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("tokenizer.ggml.token_type", "expected integers".into()))?,
            Some(_) => {
                return Err(bad(
                    "tokenizer.ggml.token_type",
                    format!("expected an array of {} integers (one per token)", tokens.len()),
                ));
            }
        };
        let pre = f
            .get("tokenizer.ggml.pre")
            .and_then(G::as_str)
            .unwrap_or("default");
        // llama.cpp's pre-tokenizers by name: the regexes each applies in turn (every piece split
        // again by the next), and whether whole pieces found in the vocabulary skip the merges.
        let (regexes, ignore_merges): (&[&str], bool) = match pre {
            "qwen2" | "deepseek-r1-qwen" | "olmo" | "dbrx" | "smaug-bpe" => (&[QWEN2_SPLIT], false),
            "llama3" | "llama-bpe" | "llama-v3" => (&[LLAMA3_SPLIT], false),
            "gpt2" | "default" | "gpt-2" | "mpt" | "olmo2" => (&[GPT2_SPLIT], false),
            // GLM-4.5/4.6/4.7: llama3's split, whole words first.
            "glm4" | "glm5" => (&[LLAMA3_SPLIT], true),
            "chatglm-bpe" => (&[LLAMA3_SPLIT], false),
            // gpt-oss (and Llama 4): o200k's split, case runs within words.
            "gpt-4o" | "llama4" => (&[GPT4O_SPLIT], false),
            // DeepSeek-V3/R1: digits in threes, CJK runs, then the rest.
            "deepseek-v3" => (&DEEPSEEK3_SPLITS, false),
            // Kimi-K2: llama.cpp's own split (its code, not the tiktoken pattern it names):
            // Han runs apart, other letters in whole runs, digits in threes.
            "kimi-k2" => (&[KIMI_K2_SPLIT], false),
            other => {
                return Err(bad(
                    "tokenizer.ggml.pre",
                    format!(
                        "pre-tokenizer `{other}` is not one the engine builds (qwen2, llama3, gpt2, glm4, gpt-4o, deepseek-v3, kimi-k2); give --tokenizer DIR"
                    ),
                ));
            }
        };
        let id = |key: &str| f.get(key).and_then(G::as_u64).map(|i| i as usize);
        let name_of = |i: Option<usize>| i.and_then(|i| tokens.get(i)).cloned();
        let bos = name_of(id("tokenizer.ggml.bos_token_id"));
        let eos = name_of(id("tokenizer.ggml.eos_token_id"));
        let add_bos = matches!(f.get("tokenizer.ggml.add_bos_token"), Some(G::Bool(true)));
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            vocab.insert(t.clone(), serde_json::json!(i));
            // llama.cpp's token types: 3 control, 4 user-defined.
            if *ty == 3 || *ty == 4 {
                added.push(serde_json::json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty == 3,
                }));
            }
        }
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(serde_json::json!([a, b])),
                None => Err(bad(
                    "tokenizer.ggml.merges",
                    format!("merge `{m}` is not two tokens separated by a space"),
                )),
            })
            .collect::<Result<_>>()?;
        let post = match (&bos, add_bos) {
            (Some(b), true) => serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {b.as_str(): {"id": b, "ids": [id("tokenizer.ggml.bos_token_id")], "tokens": [b]}},
            }),
            _ => Value::Null,
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": regexes
                .iter()
                .map(|r| serde_json::json!(
                    {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}
                ))
                .chain(std::iter::once(serde_json::json!(
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                )))
                .collect::<Vec<_>>()},
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer =
            json.to_string()
                .parse()
                .map_err(|e: tokenizers::Error| EngineError::Tokenizer {
                    path: path.clone(),
                    message: format!("tokenizer.ggml.*: {}", e.to_string().replace('\n', " ")),
                })?;
        let chat_template = match f.get("tokenizer.chat_template") {
            None => None,
            Some(G::String(t)) => Some(t.clone()),
            Some(v) => {
                return Err(bad(
                    "tokenizer.chat_template",
                    format!("expected a string, found {}", v.type_name()),
                ));
            }
        };
        Ok(Self {
            inner,
            chat_template,
            template_path: path.clone(),
            bos_token: bos,
            eos_token: eos,
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
        // transformers' template environment: the current UTC time, formatted as Python does.
        env.add_function("strftime_now", |fmt: String| -> String {
            crate::clock::Civil::from_unix(crate::clock::unix_now()).strftime(&fmt)
        });
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

/// The split rules of llama.cpp's pre-tokenizers (`llama-vocab.cpp`), as `tokenizers` regexes.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const KIMI_K2_SPLIT: &str = r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{L}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const DEEPSEEK3_SPLITS: [&str; 3] = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];

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
