//! Prompt datasets (JSONL): `{"id", "domain", "prompt"}` or `{"id", "domain", "messages"}`.
//! See `datasets/README.md`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use shadowmoe_engine::{ChatMessage, Tokenizer};

/// One prompt of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Line order in the file, from 0: the trace's `request`.
    pub index: usize,
    pub id: String,
    pub domain: String,
    /// The conversation; a `prompt` line becomes one user message.
    pub messages: Vec<ChatMessage>,
    /// True for `prompt` lines (raw text, usable without a chat template).
    pub is_raw: bool,
}

impl Prompt {
    /// Token ids: through the model's chat template when it has one and `chat` is set (a raw
    /// prompt becomes a user message); raw text as is otherwise. Without `chat`, a chat prompt
    /// becomes its messages' contents joined by blank lines (for base models that never saw a
    /// chat template).
    pub fn encode(&self, tok: &Tokenizer, chat: bool) -> Result<Vec<u32>> {
        if chat && tok.has_chat_template() {
            return Ok(tok.encode_chat(&self.messages)?);
        }
        if self.is_raw {
            return Ok(tok.encode(&self.messages[0].content)?);
        }
        if !chat {
            let text: Vec<&str> = self.messages.iter().map(|m| m.content.as_str()).collect();
            return Ok(tok.encode(&text.join("\n\n"))?);
        }
        bail!(
            "prompt `{}` is a chat but the model has no chat template",
            self.id
        )
    }
}

/// Reads a dataset; returns its prompts and the file's sha256.
pub fn load(path: &Path) -> Result<(Vec<Prompt>, String)> {
    let bytes = std::fs::read(path).with_context(|| format!("--dataset: cannot read {}", path.display()))?;
    let sha = shadowmoe_engine::offload::pack::sha256_bytes(&bytes);
    let text = std::str::from_utf8(&bytes).with_context(|| format!("{}: not UTF-8", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", at()))?;
        let field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("{}: missing string field `{k}`", at()))
        };
        let (messages, is_raw) = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(p)), None) => (vec![ChatMessage::user(p.clone())], true),
            (None, Some(Value::Array(ms))) if !ms.is_empty() => {
                let mut out = Vec::new();
                for m in ms {
                    let role = m.get("role").and_then(Value::as_str);
                    let content = m.get("content").and_then(Value::as_str);
                    match (role, content) {
                        (Some(r @ ("system" | "user" | "assistant")), Some(c)) => out.push(ChatMessage {
                            role: r.into(),
                            content: c.into(),
                        }),
                        _ => bail!(
                            "{}: each message needs role system|user|assistant and string content",
                            at()
                        ),
                    }
                }
                (out, false)
            }
            _ => bail!(
                "{}: needs exactly one of `prompt` (a string) or `messages` (a non-empty list)",
                at()
            ),
        };
        prompts.push(Prompt {
            index: prompts.len(),
            id: field("id")?,
            domain: field("domain")?,
            messages,
            is_raw,
        });
    }
    if prompts.is_empty() {
        bail!("--dataset: {} holds no prompts", path.display());
    }
    Ok((prompts, sha))
}
