//! The engine: one loaded model with its tokenizer and chat template, the single entry
//! point that the CLI (and later the server and the eval harness) drive.

use std::path::Path;

use crate::chat::{ChatTemplate, Message};
use crate::error::Result;
use crate::generate::{generate, GenerateOptions, Generation};
use crate::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

impl Engine {
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        Ok(Engine {
            model: Model::load(&gguf)?,
            tokenizer: Tokenizer::from_gguf(&gguf)?,
            template: ChatTemplate::from_gguf(&gguf)?,
        })
    }

    /// Token ids of a chat with an optional system message and one user turn, ending with
    /// the assistant header so that the model's answer comes next.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", user));
        let text = self.template.render(&messages, true)?;
        self.encode_prompt(&text)
    }

    /// Token ids of raw prompt text, special tokens parsed, BOS added if the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            ids.extend(self.tokenizer.bos_id());
        }
        ids.extend(self.tokenizer.encode(text, true)?);
        Ok(ids)
    }

    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        generate(&self.model, &self.tokenizer, prompt, options, on_text)
    }
}
