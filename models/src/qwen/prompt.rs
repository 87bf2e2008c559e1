//! The multiple-choice question in each family's chat format, tokenized by the model
//! directory's own `tokenizer.json` (the `tokenizers` crate, as transformers' fast tokenizers).
//!
//! The text is what the instruct checkpoints' chat templates render for one user turn holding
//! one clip and the question, with the default system prompt and the assistant's turn opened:
//! the model's next token is its answer, one of the option letters. Qwen2-Audio puts the clip as
//! `Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>` and a newline before the text; Qwen2-VL puts
//! a video as `<|vision_start|><|video_pad|><|vision_end|>` right before it. Qwen2 adds no
//! BOS token, so the encoding takes no special tokens beyond those in the text. The one
//! placeholder is then expanded to as many tokens as the clip gives the language model.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::LoadError;

/// Which template, and which placeholder stands for the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Audio,
    Vl,
}

impl Family {
    /// The placeholder token of the clip in this family's vocabulary.
    pub fn placeholder(self) -> &'static str {
        match self {
            Family::Audio => "<|AUDIO|>",
            Family::Vl => "<|video_pad|>",
        }
    }

    fn clip(self) -> &'static str {
        match self {
            Family::Audio => "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
            Family::Vl => "<|vision_start|><|video_pad|><|vision_end|>",
        }
    }
}

/// The option letters, A to J: one answer token each.
pub const LETTERS: [&str; 10] = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "J"];

/// A family's question prompt under one tokenizer.
#[derive(Debug, Clone)]
pub struct ChatPrompt {
    family: Family,
    tokenizer: Tokenizer,
    placeholder: u32,
    letters: Vec<u32>,
}

impl ChatPrompt {
    /// Reads `dir/tokenizer.json`. `placeholder` is the id the model's `config.json` gives the
    /// clip's token (`audio_token_index`, `video_token_id`); the tokenizer must agree, and must
    /// encode every option letter as one token.
    pub fn load(dir: &Path, family: Family, placeholder: u32) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| LoadError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Self::new(tokenizer, family, placeholder, path)
    }

    fn new(
        tokenizer: Tokenizer,
        family: Family,
        placeholder: u32,
        path: PathBuf,
    ) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.clone(),
            message,
        };
        let token = family.placeholder();
        match tokenizer.token_to_id(token) {
            Some(id) if id == placeholder => {}
            found => {
                return Err(bad(format!(
                    "{token} is {found:?} here, but the model's config.json says {placeholder}"
                )))
            }
        }
        let mut letters = Vec::with_capacity(LETTERS.len());
        for letter in LETTERS {
            let enc = tokenizer
                .encode(letter, false)
                .map_err(|e| bad(format!("encoding {letter:?}: {e}")))?;
            match enc.get_ids() {
                [id] => letters.push(*id),
                ids => {
                    return Err(bad(format!(
                        "the option letter {letter:?} is {} tokens, not one",
                        ids.len()
                    )))
                }
            }
        }
        Ok(Self {
            family,
            tokenizer,
            placeholder,
            letters,
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Token ids of the letters A..J, in order.
    pub fn letters(&self) -> &[u32] {
        &self.letters
    }

    /// The id of `token` in this vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The clip's placeholder id.
    pub fn placeholder(&self) -> u32 {
        self.placeholder
    }

    /// The question, one option per line after its letter.
    pub fn question(options: &[&str]) -> String {
        let mut q = String::from("Which of these makes the sound? Answer with its letter.");
        for (letter, option) in LETTERS.iter().zip(options) {
            q.push_str(&format!("\n{letter}. {option}"));
        }
        q
    }

    /// The rendered chat prompt with one placeholder for the clip.
    pub fn text(&self, options: &[&str]) -> String {
        format!(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\n{}{}<|im_end|>\n<|im_start|>assistant\n",
            self.family.clip(),
            Self::question(options)
        )
    }

    /// Token ids of the prompt, its placeholder expanded to `clip_tokens` copies.
    pub fn encode(&self, options: &[&str], clip_tokens: usize) -> candle_core::Result<Vec<u32>> {
        if options.len() > LETTERS.len() {
            candle_core::bail!("{} options, at most {}", options.len(), LETTERS.len());
        }
        let enc = self
            .tokenizer
            .encode(self.text(options), false)
            .map_err(|e| candle_core::Error::Msg(format!("tokenizing the prompt: {e}")))?;
        super::audio::expand_placeholders(enc.get_ids(), self.placeholder, &[clip_tokens])
    }
}
