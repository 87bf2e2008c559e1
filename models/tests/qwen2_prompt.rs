//! The question prompt of each family through the model directory's `tokenizer.json`: the same
//! text and token ids as Hugging Face `tokenizers` in Python gives
//! (tests/reference/make_tiny_tokenizer.py wrote the tiny fixtures' tokenizer and
//! fixtures/qwen2_prompt_case.json), the clip placeholder expanded in place, and clear errors
//! for a directory whose tokenizer does not fit its model.

mod common;

use common::{fixtures, prompt_case, prompt_options};
use xkd_models::qwen::prompt::LETTERS;
use xkd_models::qwen::{ChatPrompt, Family, Qwen2Audio, Qwen2Vl};

fn load(family: Family) -> ChatPrompt {
    let (dir, id) = match family {
        Family::Audio => {
            let dir = fixtures().join("qwen2-audio-tiny");
            let id = Qwen2Audio::read_config(&dir).unwrap().audio_token_index;
            (dir, id)
        }
        Family::Vl => {
            let dir = fixtures().join("qwen2-vl-tiny");
            let id = Qwen2Vl::read_config(&dir).unwrap().video_token_id;
            (dir, id)
        }
    };
    ChatPrompt::load(&dir, family, id).expect("tokenizer.json loads")
}

#[test]
fn both_families_render_and_encode_the_question_as_python_tokenizers_does() {
    let case = prompt_case();
    let options = prompt_options(&case);
    for (family, key) in [(Family::Audio, "audio"), (Family::Vl, "vl")] {
        let prompt = load(family);
        assert_eq!(prompt.text(&options), case[key]["text"].as_str().unwrap());
        let want: Vec<u32> = case[key]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(prompt.encode(&options, 1).unwrap(), want, "{key}");

        // Five clip tokens: the one placeholder becomes five in place, nothing else moves.
        let five = prompt.encode(&options, 5).unwrap();
        let at = want
            .iter()
            .position(|&t| t == prompt.placeholder())
            .unwrap();
        assert_eq!(five.len(), want.len() + 4);
        assert_eq!(&five[..at], &want[..at]);
        assert!(five[at..at + 5].iter().all(|&t| t == prompt.placeholder()));
        assert_eq!(&five[at + 5..], &want[at + 1..]);

        // Each letter is one token, distinct, and the prompt spells them in order.
        let letters = prompt.letters().to_vec();
        assert_eq!(letters.len(), LETTERS.len());
        let mut sorted = letters.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), letters.len());
        let in_prompt: Vec<u32> = want
            .iter()
            .copied()
            .filter(|t| letters.contains(t))
            .collect();
        assert_eq!(
            in_prompt, letters,
            "{key}: the options' letters A..J in order"
        );
    }
}

#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused_naming_the_file() {
    let dir = fixtures().join("qwen2-audio-tiny");
    let e = ChatPrompt::load(&dir, Family::Audio, 5)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json")
            && e.contains("<|AUDIO|>")
            && e.contains("997")
            && e.contains('5'),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = ChatPrompt::load(empty.path(), Family::Vl, 994)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
