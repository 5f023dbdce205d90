"""A WordPiece tokenizer trained in a test from a few sentences: no download, BERT-style specials."""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(corpus: list[str], vocab_size: int = 300, special_tokens: list[str] = SPECIALS):
    """Train on `corpus`; the order of `special_tokens` fixes their ids."""
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(
        corpus, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special_tokens)
    )
    return BertTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
