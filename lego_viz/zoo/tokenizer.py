"""Character-level tokenizer for the demo zoo, built as a standard HF fast tokenizer.

Built with the `tokenizers` library (WordLevel over single characters), so the saved
folder loads with plain `AutoTokenizer.from_pretrained` and needs no custom code.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every character any zoo prompt or answer may contain; order fixes the token ids.
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :=+-"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the zoo's character tokenizer (one token per character, BOS added on encode).

    Returns:
        A fast tokenizer with left padding (for batched generation) whose `save_pretrained`
        output reloads with `AutoTokenizer.from_pretrained`.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
