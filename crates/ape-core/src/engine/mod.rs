//! The engine: one loaded model with its tokenizer and chat template, the single entry
//! point that the CLI, the server and the eval harness drive.
//!
//! A request is a [`Prompt`] (shared prefix, contexts, query) and a [`Mode`]:
//! - `sequential` reads prefix, contexts and query as one causal sequence (the accuracy
//!   reference);
//! - `parallel` and `ape` encode each context on its own after the shared prefix, all at
//!   the same positions, and let the query attend to all of them with APE's temperature
//!   and scale (both 1 for `parallel`); `ape` may first recompute a share of the context
//!   tokens over the contexts laid out in order ([`Recompute`]), which at the full share
//!   is sequential reading.
//!
//! The prefix's keys and values are computed once per distinct prefix and kept (the few
//! most recent ones, while the KV budget has room); so are whole conversations after plain
//! generation, whose next turn then reads only its new tokens. Every request charges the
//! keys and values it will hold to the engine's [`KvBudget`] before it allocates them.

mod batch;
pub mod chat;
pub mod generate;
mod kept;
mod mode;
mod recompute;
pub mod sampler;
mod score;

pub use mode::{
    ApeDefaults, Mode, Recompute, Selection, Shape, ShapeDefaults, DEFAULT_APE_SCALE,
    DEFAULT_APE_TEMPERATURE,
};
pub use score::Scores;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::attention::{ApeFactors, Charge, KvBudget, KvCache};
pub use crate::engine::batch::DecodeSteps;
use crate::engine::batch::{Batcher, Reading};
use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::generate::{Cancel, Decoding, GenerateOptions, Generation};
use crate::engine::kept::KeptPrompts;
use crate::engine::sampler::Sampler;
use crate::error::{Error, Result};
use crate::model::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Bytes of a document tokenized between two checks for cancellation (about a tenth of
/// a second of tokenizing).
const TOKENIZED_PIECE_BYTES: usize = 256 << 10;

/// `text` cut into pieces of at least `bytes` bytes (the last may be shorter), each cut
/// after a line break that stands alone between two visible characters. The byte-level
/// BPE pre-tokenizers ape reads make such a line break a token of its own whether the
/// text goes on or ends there (a longer run of white space would not be: before a word its
/// last character is split off), so tokenizing the pieces one by one gives the whole
/// text's tokens.
fn pieces_at_lone_line_breaks(text: &str, bytes: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let lone_line_break = |(before, at, after): (char, char, char)| {
            at == '\n' && !before.is_whitespace() && !after.is_whitespace()
        };
        let cut = rest
            .get(bytes..)
            .and_then(|tail| {
                let chars = tail.char_indices();
                let triples = chars
                    .clone()
                    .zip(tail.chars().skip(1))
                    .zip(tail.chars().skip(2))
                    .map(|(((_, before), at), after)| (before, at, after));
                chars
                    .skip(1)
                    .zip(triples)
                    .find(|(_, triple)| lone_line_break(*triple))
                    .map(|((at, _), _)| bytes + at + 1)
            })
            .unwrap_or(rest.len());
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

/// Longest context by default: documents longer than this are cut into several contexts,
/// so that a document longer than the window can still be asked about, and the query,
/// which starts after the longest context, keeps room in the window.
pub const DEFAULT_CHUNK_TOKENS: usize = 2048;
/// Most tokens in a group of a many-shot request's contexts, unless the engine is told
/// otherwise ([`Engine::with_group_tokens`]).
pub const DEFAULT_GROUP_TOKENS: usize = 512;

/// Positions an answer without a token limit keeps at least, for its contexts to be
/// recomputed (which moves the answer's start later in the window).
const UNLIMITED_ANSWER_ROOM: usize = 256;

/// Separates a document from what follows it in the user's turn.
const DOCUMENT_SEPARATOR: &str = "\n\n";

/// A request's tokens, split the way APE reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Shared by every context: BOS, the chat template's head, the system text.
    pub prefix: Vec<u32>,
    /// The documents or demonstrations, each encoded on its own.
    pub contexts: Vec<Vec<u32>>,
    /// The question and whatever the template puts before the answer.
    pub query: Vec<u32>,
}

impl Prompt {
    /// The tokens sequential encoding reads: prefix, contexts in order, query.
    pub fn sequential_tokens(&self) -> Vec<u32> {
        let mut tokens = self.prefix.clone();
        self.contexts.iter().for_each(|c| tokens.extend(c));
        tokens.extend(&self.query);
        tokens
    }

    /// Every token of the request, counted once.
    pub fn total_tokens(&self) -> usize {
        self.prefix.len() + self.contexts.iter().map(Vec::len).sum::<usize>() + self.query.len()
    }

    fn longest_context(&self) -> usize {
        self.contexts.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// Keeps encoded contexts between requests, and between processes if it wants: the
/// engine asks it before encoding a context and hands it every context it encodes. A store
/// that fails (a corrupt entry, an unreachable server) reports it itself and answers as
/// if it had nothing; the engine then encodes the context again.
pub trait ContextStore: Send + Sync {
    /// The keys and values of `context` encoded after `prefix` by this engine's model.
    fn get(&self, prefix: &[u32], context: &[u32]) -> Option<Arc<KvCache>>;
    /// Keep a context just encoded after `prefix`.
    fn put(&self, prefix: &[u32], context: &[u32], kv: Arc<KvCache>);
}

/// A loaded model with its tokenizer and chat template, and what it keeps between
/// requests (the KV budget, recent prompts' caches, a context store if given): every
/// request goes through it. Built by [`Engine::load`], then set up with the `with_*` methods.
pub struct Engine {
    /// The weights and their forward pass; shared with the batcher's thread.
    pub model: Arc<Model>,
    /// The model's own tokenizer, read from the same file.
    pub tokenizer: Tokenizer,
    /// The model's chat template; `None` for a base model, which reads plain text only.
    pub template: Option<ChatTemplate>,
    /// What every request's keys and values and the kept caches are charged to.
    budget: Arc<KvBudget>,
    /// Keys and values of recent prompts (prefixes, conversations).
    kept: Arc<KeptPrompts>,
    store: Option<Arc<dyn ContextStore>>,
    /// Longest context, in tokens: longer documents are cut into several.
    chunk_tokens: usize,
    /// Longest group of a many-shot request's contexts, in tokens; 0 leaves them apart.
    group_tokens: usize,
    /// Whether plain generation reuses and keeps conversations' keys and values.
    reuse_prompts: bool,
    /// APE's settings for requests that name none.
    ape_defaults: ApeDefaults,
    /// Decodes the requests running at the same time together, when there is one.
    batcher: Option<Batcher>,
}

impl Engine {
    /// Read the model, tokenizer and chat template from the GGUF file at `path`. Until the
    /// `with_*` methods say otherwise: keys and values charged to half the memory
    /// available, documents cut at [`DEFAULT_CHUNK_TOKENS`], many-shot contexts grouped by
    /// [`DEFAULT_GROUP_TOKENS`], the paper's APE settings, no store, no batching and no
    /// prompt reuse.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        let budget = KvBudget::for_machine();
        Ok(Engine {
            model: Arc::new(Model::load(&gguf)?),
            tokenizer: Tokenizer::from_gguf(&gguf)?,
            template: ChatTemplate::from_gguf(&gguf)?,
            kept: KeptPrompts::new(budget.clone()),
            budget,
            store: None,
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            group_tokens: DEFAULT_GROUP_TOKENS,
            reuse_prompts: false,
            ape_defaults: ApeDefaults::default(),
            batcher: None,
        })
    }

    /// Read requests that leave APE's settings out with `defaults` (a model's calibrated
    /// settings) instead of the paper's.
    pub fn with_ape_defaults(mut self, defaults: ApeDefaults) -> Self {
        self.ape_defaults = defaults;
        self
    }

    /// APE's settings for requests that name none.
    pub fn ape_defaults(&self) -> &ApeDefaults {
        &self.ape_defaults
    }

    /// Run requests that run at the same time (on several threads) together: each step
    /// is one forward pass with every decoding request's next token and a chunk of at
    /// most `chunk_tokens` tokens of a prompt being read (see `engine::batch`); each
    /// request's tokens stay those it gets alone. For servers.
    pub fn with_batching(mut self, chunk_tokens: usize) -> Self {
        self.batcher = Some(Batcher::start(self.model.clone(), chunk_tokens.max(1)));
        self
    }

    /// Charge keys and values to a budget of `bytes` instead of the default (half the
    /// memory available at start). Before [`Engine::with_store`]: a store's memory tier
    /// takes the budget from [`Engine::kv_budget`].
    pub fn with_kv_memory(mut self, bytes: usize) -> Self {
        self.budget = KvBudget::new(bytes);
        self.kept = KeptPrompts::new(self.budget.clone());
        self
    }

    /// What requests' keys and values and the kept caches are charged to.
    pub fn kv_budget(&self) -> &Arc<KvBudget> {
        &self.budget
    }

    /// A charge for `positions` positions of keys and values.
    fn charge(&self, positions: usize) -> Result<Charge> {
        self.budget.charge(self.model.kv_bytes(positions))
    }

    /// The batched decoding steps run so far ([`Engine::with_batching`]).
    pub fn decode_steps(&self) -> Option<&DecodeSteps> {
        self.batcher.as_ref().map(Batcher::counts)
    }

    /// Let plain generation reuse the keys and values of the longest start a prompt shares
    /// with a kept one, and keep each exchange for the next turn: a conversation's next
    /// turn reads only its new tokens. A token's keys and values do not depend on the
    /// batch they were computed in, so a reused prompt answers as a fresh read would.
    pub fn with_prompt_reuse(mut self) -> Self {
        self.reuse_prompts = true;
        self
    }

    /// Cut documents longer than `tokens` into several contexts (at least 16 tokens).
    pub fn with_chunk_tokens(mut self, tokens: usize) -> Result<Self> {
        if tokens < 16 {
            return Err(Error::ApeSetting(format!(
                "a document chunk must allow at least 16 tokens, got {tokens}"
            )));
        }
        self.chunk_tokens = tokens;
        Ok(self)
    }

    /// Join a many-shot request's contexts ([`Shape::ManyShot`]: many short ones, the
    /// demonstrations of in-context learning) into groups of at most `tokens` tokens, each
    /// encoded as one context; 0 keeps every context apart. See [`Engine::group_contexts`].
    pub fn with_group_tokens(mut self, tokens: usize) -> Self {
        self.group_tokens = tokens;
        self
    }

    /// `contexts` as the engine encodes them: those of a many-shot request joined in
    /// order into groups of at most the group size ([`Engine::with_group_tokens`]), a
    /// context longer than that alone; any other request's unchanged. Demonstrations
    /// encoded one per context never see each other, and on many of them APE keeps well
    /// under sequential reading's accuracy (Qwen2.5-Coder-0.5B, 128 sentiment
    /// demonstrations: 84% of it at the best factors); in groups they see their
    /// neighbours as sequential reading shows them, at the cost of reusing a stored group
    /// only with the same demonstrations in the same order. The joined tokens are the
    /// contexts' own, so sequential reading reads the same tokens either way.
    pub fn group_contexts(&self, contexts: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
        if self.group_tokens == 0 || Shape::of(&contexts) != Shape::ManyShot {
            return contexts;
        }
        let mut groups: Vec<Vec<u32>> = Vec::new();
        for context in contexts {
            match groups.last_mut() {
                Some(group) if group.len() + context.len() <= self.group_tokens => {
                    group.extend(context)
                }
                _ => groups.push(context),
            }
        }
        groups
    }

    /// Look contexts up in `store` before encoding them, and keep what is encoded there.
    pub fn with_store(mut self, store: Arc<dyn ContextStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Token ids of a chat with an optional system message and one user turn, ending with
    /// the assistant header so that the model's answer comes next.
    pub fn chat_prompt(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        let mut messages: Vec<Message> = system.map(Message::system).into_iter().collect();
        messages.push(Message::user(user));
        self.conversation_prompt(&messages)
    }

    /// Token ids of raw prompt text, special tokens parsed, BOS added if the model wants it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.tokenizer.add_bos() {
            ids.extend(self.tokenizer.bos_id());
        }
        ids.extend(self.encode_within_window(text, true)?);
        Ok(ids)
    }

    /// `text`'s tokens (control-token text parsed into control tokens with
    /// `parse_special`), refused before tokenizing when it is too long for any
    /// tokenization of it to fit the window.
    fn encode_within_window(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let window = self.model.config.context_length;
        let at_least = self.tokenizer.fewest_tokens(text);
        if at_least > window {
            return Err(Error::TextOverflow {
                bytes: text.len(),
                at_least,
                window,
            });
        }
        self.tokenizer.encode(text, parse_special)
    }

    /// Plain generation from prompt tokens, with no contexts. With
    /// [`Engine::with_prompt_reuse`], the keys and values of the longest start this prompt
    /// shares with a kept one (a previous turn of the same conversation, say) are reused,
    /// and the whole exchange is kept for the next turn.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let start = Instant::now();
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let whole = Prompt {
            prefix: prompt.to_vec(),
            contexts: Vec::new(),
            query: Vec::new(),
        };
        let max_tokens = self.check_window(&whole, Mode::Sequential, options.max_tokens)?;
        let sampler = Sampler::new(options.sampling.clone())?;
        let capacity = prompt.len() + max_tokens;
        let _charge = self.charge(capacity)?;
        let (cache, cached) = match self.reuse_prompts {
            true => self.resume(prompt, capacity),
            false => (self.model.new_cache(capacity), 0),
        };
        let decoding = Decoding {
            tokenizer: &self.tokenizer,
            options,
            sampler,
            max_tokens,
            history: whole.prefix,
            start,
        };
        let (mut generation, cache) = self.read_and_generate(cache, cached, decoding, on_text)?;
        generation.cached_tokens = cached;
        if self.reuse_prompts {
            let mut tokens = prompt.to_vec();
            tokens.extend(&generation.tokens);
            tokens.truncate(cache.len());
            self.kept.keep(
                tokens,
                Arc::new(cache.copy_prefix(cache.len(), cache.len())),
            );
        }
        Ok(generation)
    }

    /// A cache holding the keys and values of the longest start `prompt` shares with a
    /// kept prompt (at most all but its last token, whose logits are needed), with room
    /// for `capacity` positions; and how many positions it holds.
    fn resume(&self, prompt: &[u32], capacity: usize) -> (KvCache, usize) {
        match self.kept.longest_shared(prompt, prompt.len() - 1) {
            Some((kv, n)) => (kv.copy_prefix(n, capacity), n),
            None => (self.model.new_cache(capacity), 0),
        }
    }

    /// Split one chat turn (optional system text, documents, question) the way the chat
    /// template lays it out: the prefix is everything the template puts before the user's
    /// words; each document, followed by a blank line, is a context; the query is the
    /// question and everything the template puts after the user's words (the end of the
    /// turn and the assistant header). Read sequentially, the three give the same text as
    /// the template applied to a user turn of the documents followed by the question.
    ///
    /// A base model (no chat template) reads the same request as plain text: the system
    /// text and a blank line, the documents, the question ([`Engine::split_text`]).
    pub fn split_chat(
        &self,
        system: Option<&str>,
        documents: &[impl AsRef<str>],
        question: &str,
    ) -> Result<Prompt> {
        if self.template.is_none() {
            let head = system.map_or(String::new(), |s| format!("{s}{DOCUMENT_SEPARATOR}"));
            return self.split_text(&head, documents, question);
        }
        let turns: Vec<Message> = system.map(Message::system).into_iter().collect();
        self.split_conversation(&turns, documents, question)
    }

    /// [`Engine::split_chat`] for a conversation: `turns` (system, user and assistant
    /// messages) come before the user turn that holds the documents and the question, and
    /// belong to the prefix.
    pub fn split_conversation(
        &self,
        turns: &[Message],
        documents: &[impl AsRef<str>],
        question: &str,
    ) -> Result<Prompt> {
        const MARK: &str = "APEUSERTURNMARK";
        let mut messages = turns.to_vec();
        messages.push(Message::user(MARK));
        let text = self.chat_template()?.render(&messages, true)?;
        let at = text.find(MARK).ok_or_else(|| {
            Error::Template(
                "the chat template does not copy the user's message into the prompt verbatim, \
                 so it cannot be split into prefix, contexts and query"
                    .to_string(),
            )
        })?;
        let (head, tail) = (&text[..at], &text[at + MARK.len()..]);
        let mut prompt = self.split_text(head, documents, question)?;
        // The template's own end of turn and answer header, whose markers are control
        // tokens; the question before them is the user's text, read as text.
        prompt.query.extend(self.tokenizer.encode(tail, true)?);
        Ok(prompt)
    }

    /// A prompt without a chat template, split like [`Engine::split_chat`]: the prefix is
    /// `head` (after BOS, if the model wants one), each document followed by a blank line is
    /// a context, and the query is `question`, whose continuation is the answer. This is
    /// the few-shot layout of base models, where a demonstration's label continues its own
    /// text ("Review: ...\nSentiment: positive") and the query ends where the label goes.
    /// Documents and question are the user's text: a chat marker written in them stays
    /// text (`<|im_end|>` in a document cannot end a turn).
    pub fn split_text(
        &self,
        head: &str,
        documents: &[impl AsRef<str>],
        question: &str,
    ) -> Result<Prompt> {
        let mut contexts = Vec::with_capacity(documents.len());
        for document in documents {
            contexts.extend(self.document_contexts(document.as_ref(), &Cancel::default())?);
        }
        Ok(Prompt {
            prefix: self.encode_prompt(head)?,
            contexts: self.group_contexts(contexts),
            query: self.encode_within_window(question, false)?,
        })
    }

    /// The contexts one document becomes: its text, trailing space trimmed, then a blank
    /// line separating it from what follows, as tokens; cut into pieces of at most the
    /// chunk size (see [`Engine::with_chunk_tokens`]) when longer, each cut after a line
    /// break where one falls in the last quarter of the piece. Joined in order, the pieces
    /// are the whole document's tokens. A long text is tokenized in pieces of about
    /// `TOKENIZED_PIECE_BYTES`, checking `cancel` before each.
    pub fn document_contexts(&self, document: &str, cancel: &Cancel) -> Result<Vec<Vec<u32>>> {
        let text = format!("{}{DOCUMENT_SEPARATOR}", document.trim_end());
        let mut tokens = Vec::new();
        for piece in pieces_at_lone_line_breaks(&text, TOKENIZED_PIECE_BYTES) {
            cancel.check()?;
            tokens.extend(self.tokenizer.encode(piece, false)?);
        }
        let limit = self.chunk_tokens;
        let mut chunks = Vec::with_capacity(tokens.len().div_ceil(limit));
        let mut rest = &tokens[..];
        while rest.len() > limit {
            let ends_line = |&at: &usize| {
                self.tokenizer
                    .decode(&rest[at - 1..at])
                    .is_ok_and(|text| text.ends_with('\n'))
            };
            let cut = (limit - limit / 4..=limit)
                .rev()
                .find(ends_line)
                .unwrap_or(limit);
            chunks.push(rest[..cut].to_vec());
            rest = &rest[cut..];
        }
        chunks.push(rest.to_vec());
        Ok(chunks)
    }

    /// The model's chat template, or [`Error::NoChatTemplate`] for a base model.
    pub(crate) fn chat_template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or(Error::NoChatTemplate)
    }

    /// Token ids of a whole conversation, ending with the assistant header so that the
    /// model's answer comes next.
    pub fn conversation_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.chat_template()?.render(messages, true)?;
        self.encode_prompt(&text)
    }

    /// Keys and values of `prefix`, computed on first use and kept.
    pub fn prefix_kv(&self, prefix: &[u32]) -> Result<Arc<KvCache>> {
        Ok(self.find_prefix_kv(prefix, &Cancel::default())?.0)
    }

    /// [`Engine::prefix_kv`], and how many of its tokens were kept from an earlier
    /// request (all or none).
    fn find_prefix_kv(&self, prefix: &[u32], cancel: &Cancel) -> Result<(Arc<KvCache>, usize)> {
        let window = self.model.config.context_length;
        if prefix.len() >= window {
            return Err(Error::ContextOverflow {
                tokens: prefix.len(),
                max_new: 0,
                window,
            });
        }
        if let Some(kv) = self.kept.exact(prefix) {
            return Ok((kv, prefix.len()));
        }
        let mut cache = self.model.new_cache(prefix.len());
        if !prefix.is_empty() {
            self.read_chunks(prefix, &mut cache, &Reading::Causal, cancel)?;
        }
        let kv = Arc::new(cache);
        self.kept.keep(prefix.to_vec(), kv.clone());
        Ok((kv, 0))
    }

    /// Encode each context independently after `prefix` (its keys and values, from
    /// [`Engine::prefix_kv`]), short ones batched together.
    pub fn encode_contexts(
        &self,
        prefix: &Arc<KvCache>,
        contexts: &[&[u32]],
    ) -> Result<Vec<KvCache>> {
        let mut encoded = Vec::with_capacity(contexts.len());
        self.encode_batches(prefix, contexts, &Cancel::default(), |_, kv| {
            encoded.push(kv)
        })?;
        Ok(encoded)
    }

    /// [`Engine::encode_contexts`], handing each context to `done` (with its index) as
    /// soon as its batch is finished, and checking `cancel` before each batch and before
    /// each piece of a context longer than a batch: a cancelled call has handed over
    /// everything it finished.
    fn encode_batches(
        &self,
        prefix: &Arc<KvCache>,
        contexts: &[&[u32]],
        cancel: &Cancel,
        mut done: impl FnMut(usize, KvCache),
    ) -> Result<()> {
        let window = self.model.config.context_length;
        if let Some(longest) = contexts.iter().map(|c| c.len()).max() {
            if prefix.len() + longest > window {
                return Err(Error::ApeWindowOverflow {
                    prefix: prefix.len(),
                    longest,
                    query: 0,
                    max_new: 0,
                    window,
                });
            }
        }
        let limit = self
            .batcher
            .as_ref()
            .map_or_else(|| self.model.tokens_per_pass(), |b| b.chunk_tokens);
        let mut batch: Vec<usize> = Vec::new();
        let mut batch_tokens = 0;
        let run_batch = |batch: &mut Vec<usize>, done: &mut dyn FnMut(usize, KvCache)| {
            let texts: Vec<&[u32]> = batch.iter().map(|&i| contexts[i]).collect();
            let encoded = self.encode_together(prefix, &texts, cancel)?;
            for (i, kv) in batch.drain(..).zip(encoded) {
                done(i, kv);
            }
            Ok::<_, Error>(())
        };
        for (i, &context) in contexts.iter().enumerate() {
            if !batch.is_empty() && batch_tokens + context.len() > limit {
                run_batch(&mut batch, &mut done)?;
                batch_tokens = 0;
            }
            if context.len() > limit {
                // A long context goes in pieces, to bound the activations held at once.
                let mut own = self.model.new_cache(context.len());
                for piece in context.chunks(limit) {
                    self.extend_context(prefix, &mut own, piece, cancel)?;
                }
                done(i, own);
                continue;
            }
            batch.push(i);
            batch_tokens += context.len();
        }
        if !batch.is_empty() {
            run_batch(&mut batch, &mut done)?;
        }
        Ok(())
    }

    /// Contexts encoded side by side after `prefix`: in one step of the batch when
    /// batching, else in one pass of their own.
    fn encode_together(
        &self,
        prefix: &Arc<KvCache>,
        texts: &[&[u32]],
        cancel: &Cancel,
    ) -> Result<Vec<KvCache>> {
        let Some(batcher) = &self.batcher else {
            return self.model.encode_contexts(prefix, texts, cancel);
        };
        cancel.check()?;
        let mut encoded: Vec<KvCache> = texts
            .iter()
            .map(|t| self.model.new_cache(t.len()))
            .collect();
        let mut pieces: Vec<(&[u32], &mut KvCache)> = texts
            .iter()
            .copied()
            .zip(encoded.iter_mut())
            .filter(|(t, _)| !t.is_empty())
            .collect();
        let reading = Reading::Context {
            prefix: prefix.clone(),
        };
        batcher.read_together(&mut pieces, &reading)?;
        Ok(encoded)
    }

    /// [`Model::extend_context`], in a step of the batch when batching.
    fn extend_context(
        &self,
        prefix: &Arc<KvCache>,
        own: &mut KvCache,
        piece: &[u32],
        cancel: &Cancel,
    ) -> Result<()> {
        let Some(batcher) = &self.batcher else {
            return self.model.extend_context(prefix, own, piece, cancel);
        };
        cancel.check()?;
        let reading = Reading::Context {
            prefix: prefix.clone(),
        };
        batcher.read(piece, own, &reading).map(drop)
    }

    /// The keys and values of each context after `prefix` (whose own keys and values are
    /// `prefix_kv`): from the store where it has them, the others encoded (in batches) and
    /// handed to the store. `cancel` is checked before each batch that is encoded.
    pub fn contexts_kv(
        &self,
        prefix: &[u32],
        prefix_kv: &Arc<KvCache>,
        contexts: &[&[u32]],
        cancel: &Cancel,
    ) -> Result<Vec<Arc<KvCache>>> {
        Ok(self
            .find_contexts_kv(prefix, prefix_kv, contexts, cancel)?
            .0)
    }

    /// [`Engine::contexts_kv`], how many of the contexts' tokens were not encoded here
    /// (found in the store, or named twice), and the charge for those encoded here (those
    /// found are charged to the store's memory tier that holds them).
    fn find_contexts_kv(
        &self,
        prefix: &[u32],
        prefix_kv: &Arc<KvCache>,
        contexts: &[&[u32]],
        cancel: &Cancel,
    ) -> Result<(Vec<Arc<KvCache>>, usize, Charge)> {
        let mut found: Vec<Option<Arc<KvCache>>> = match &self.store {
            Some(store) => contexts.iter().map(|c| store.get(prefix, c)).collect(),
            None => vec![None; contexts.len()],
        };
        // A document named twice in one request is encoded once.
        let mut first_of: HashMap<&[u32], usize> = HashMap::new();
        let missing: Vec<usize> = (0..contexts.len())
            .filter(|&i| found[i].is_none() && *first_of.entry(contexts[i]).or_insert(i) == i)
            .collect();
        let to_encode: Vec<&[u32]> = missing.iter().map(|&i| contexts[i]).collect();
        let encoded: usize = to_encode.iter().map(|c| c.len()).sum();
        let charge = self.charge(encoded)?;
        // Each context is stored as soon as it is encoded, so that a request stopped
        // half-way keeps what it paid for.
        self.encode_batches(prefix_kv, &to_encode, cancel, |j, kv| {
            let (i, kv) = (missing[j], Arc::new(kv));
            if let Some(store) = &self.store {
                store.put(prefix, contexts[i], kv.clone());
            }
            found[i] = Some(kv);
        })?;
        for i in 0..contexts.len() {
            if found[i].is_none() {
                found[i] = found[first_of[contexts[i]]].clone();
            }
        }
        let total: usize = contexts.iter().map(|c| c.len()).sum();
        Ok((
            found.into_iter().flatten().collect(),
            total - encoded,
            charge,
        ))
    }

    /// Answer `prompt` in `mode`, streaming text to `on_text`. The time to first token
    /// counts everything from this call on: the prefix (unless kept from an earlier
    /// request) and the contexts the store does not have are encoded here.
    pub fn answer(
        &self,
        prompt: &Prompt,
        mode: Mode,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let start = Instant::now();
        if prompt.query.is_empty() {
            return Err(Error::EmptyQuery);
        }
        let Some(factors) = mode.factors() else {
            return self.answer_sequentially(prompt, options, start, on_text);
        };
        let max_tokens = self.check_window(prompt, mode, options.max_tokens)?;
        let sampler = Sampler::new(options.sampling.clone())?;
        let _charge =
            self.charge(self.ape_positions(prompt, mode, options.max_tokens, max_tokens))?;
        let (prefix, prefix_found) = self.find_prefix_kv(&prompt.prefix, &options.cancel)?;
        let contexts: Vec<&[u32]> = prompt.contexts.iter().map(Vec::as_slice).collect();
        let (encoded, contexts_found, _encoded_charge) =
            self.find_contexts_kv(&prompt.prefix, &prefix, &contexts, &options.cancel)?;
        // Without a token limit, the answer may run to the end of the window from wherever
        // the query side starts, which recomputation moves later: it is done only where the
        // answer keeps room for at least `UNLIMITED_ANSWER_ROOM` tokens (or what APE alone
        // would leave it, if less).
        let answer_room = options
            .max_tokens
            .unwrap_or(max_tokens.min(UNLIMITED_ANSWER_ROOM));
        let room = prompt.query.len() + answer_room;
        let repaired = self.repair(
            prompt,
            &prefix,
            &encoded,
            mode.recompute(),
            room,
            &options.cancel,
        )?;
        let (contexts, max_tokens, recomputed, factors) = match repaired {
            Some(repaired) => {
                let read = prefix.len() + repaired.contexts.len() + prompt.query.len();
                let window = self.model.config.context_length;
                let max_tokens = options.max_tokens.unwrap_or(window - read);
                let factors = repaired.factors(factors);
                (
                    vec![repaired.contexts],
                    max_tokens,
                    repaired.recomputed,
                    factors,
                )
            }
            None => (encoded, max_tokens, 0, factors),
        };
        let decoding = Decoding {
            tokenizer: &self.tokenizer,
            options,
            sampler,
            max_tokens,
            history: prompt.sequential_tokens(),
            start,
        };
        let mut generation =
            self.answer_over(&prefix, contexts, &prompt.query, factors, decoding, on_text)?;
        generation.cached_tokens = prefix_found + contexts_found;
        generation.recomputed_tokens = recomputed;
        Ok(generation)
    }

    /// Most positions of keys and values an APE request holds besides its contexts: its
    /// own cache (prefix copy, query, answer) and, when it recomputes, the contexts laid
    /// out in order and the copy of them gathered for the query side.
    fn ape_positions(
        &self,
        prompt: &Prompt,
        mode: Mode,
        asked: Option<usize>,
        max_tokens: usize,
    ) -> usize {
        let (prefix, query) = (prompt.prefix.len(), prompt.query.len());
        if mode.recompute().share == 0.0 {
            return prefix + query + max_tokens;
        }
        let total = prompt.total_tokens();
        let own = match asked {
            Some(max_tokens) => total + max_tokens,
            None => self.model.config.context_length,
        };
        own + 2 * total
    }

    fn answer_over(
        &self,
        prefix: &KvCache,
        contexts: Vec<Arc<KvCache>>,
        query: &[u32],
        factors: ApeFactors,
        decoding: Decoding<'_>,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let mut cache = prefix.copy_with_capacity(prefix.len() + query.len() + decoding.max_tokens);
        let reading = Reading::Ape {
            prefix_len: prefix.len(),
            contexts: contexts.into(),
            factors,
        };
        let logits = self.read_chunks(query, &mut cache, &reading, &decoding.options.cancel)?;
        let _member = self.batcher.as_ref().map(Batcher::join);
        decoding.run(
            logits,
            |token| self.decode_step(token, &mut cache, &reading),
            on_text,
        )
    }

    /// Read `tokens` into `cache` after what it holds, as `reading` says, in chunks
    /// (checking `cancel` before each), beside the decoding requests' tokens when
    /// batching; the logits after the last token, the only ones computed.
    fn read_chunks(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        reading: &Reading,
        cancel: &Cancel,
    ) -> Result<Vec<f32>> {
        let chunk = self
            .batcher
            .as_ref()
            .map_or_else(|| self.model.tokens_per_pass(), |b| b.chunk_tokens);
        let mut logits = Vec::new();
        let last = tokens.len().saturating_sub(1) / chunk * chunk;
        for (start, piece) in (0..).step_by(chunk).zip(tokens.chunks(chunk)) {
            cancel.check()?;
            match (&self.batcher, start == last) {
                (Some(batcher), true) => logits = batcher.read(piece, cache, reading)?,
                (Some(batcher), false) => batcher.extend(piece, cache, reading)?,
                (None, true) => logits = reading.forward(&self.model, piece, cache),
                (None, false) => reading.extend(&self.model, piece, cache),
            }
        }
        Ok(logits)
    }

    /// The logits after `token`, appended to `cache`, in the next batched step when
    /// batching.
    fn decode_step(&self, token: u32, cache: &mut KvCache, reading: &Reading) -> Result<Vec<f32>> {
        match &self.batcher {
            Some(batcher) => batcher.decode(token, cache, reading),
            None => Ok(reading.forward(&self.model, &[token], cache)),
        }
    }

    fn answer_sequentially(
        &self,
        prompt: &Prompt,
        options: &GenerateOptions,
        start: Instant,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let total = prompt.total_tokens();
        let max_tokens = self.check_window(prompt, Mode::Sequential, options.max_tokens)?;
        let sampler = Sampler::new(options.sampling.clone())?;
        let _charge = self.charge(total + max_tokens)?;
        let (prefix, prefix_found) = self.find_prefix_kv(&prompt.prefix, &options.cancel)?;
        let decoding = Decoding {
            tokenizer: &self.tokenizer,
            options,
            sampler,
            max_tokens,
            history: prompt.sequential_tokens(),
            start,
        };
        let cache = prefix.copy_with_capacity(total + max_tokens);
        let (mut generation, _) =
            self.read_and_generate(cache, prompt.prefix.len(), decoding, on_text)?;
        generation.cached_tokens = prefix_found;
        Ok(generation)
    }

    /// Read the prompt (`decoding.history`) from position `read` on into `cache`, which
    /// holds the positions before, then generate; the finished cache comes back too.
    fn read_and_generate(
        &self,
        mut cache: KvCache,
        read: usize,
        decoding: Decoding<'_>,
        on_text: impl FnMut(&str),
    ) -> Result<(Generation, KvCache)> {
        let prompt = &decoding.history[read..];
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let cancel = &decoding.options.cancel;
        let logits = self.read_chunks(prompt, &mut cache, &Reading::Causal, cancel)?;
        let _member = self.batcher.as_ref().map(Batcher::join);
        let generation = decoding.run(
            logits,
            |token| self.decode_step(token, &mut cache, &Reading::Causal),
            on_text,
        )?;
        Ok((generation, cache))
    }

    /// How many new tokens `prompt` may have in `mode` (`max_tokens`, or up to the end of
    /// the window when it is `None`); an error naming each part when they do not fit.
    pub fn check_window(
        &self,
        prompt: &Prompt,
        mode: Mode,
        max_tokens: Option<usize>,
    ) -> Result<usize> {
        if mode.factors().is_some() {
            return self.ape_window_check(
                prompt.prefix.len(),
                prompt.longest_context(),
                prompt.query.len(),
                max_tokens,
            );
        }
        let window = self.model.config.context_length;
        let total = prompt.total_tokens();
        let max_new = max_tokens.unwrap_or(window.saturating_sub(total));
        if total.saturating_add(max_new) > window {
            return Err(Error::ContextOverflow {
                tokens: total,
                max_new,
                window,
            });
        }
        Ok(max_new)
    }

    /// The token limit of an APE request, checked against the window: the query side
    /// starts after the prefix and the longest context, and must end inside the window.
    fn ape_window_check(
        &self,
        prefix: usize,
        longest: usize,
        query: usize,
        max_tokens: Option<usize>,
    ) -> Result<usize> {
        let window = self.model.config.context_length;
        let used = prefix + longest + query;
        let max_new = max_tokens.unwrap_or(window.saturating_sub(used));
        if used.saturating_add(max_new) > window {
            return Err(Error::ApeWindowOverflow {
                prefix,
                longest,
                query,
                max_new,
                window,
            });
        }
        Ok(max_new)
    }
}
