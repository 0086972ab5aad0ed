"""Data configuration: where the tokens come from and how samples are cut from them.

Field names are Megatron-LM's flag names with ``_`` for ``-``; the string literal under each field
is its ``--help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from gigatron.core.fields import SequenceLengthConfig

TOKENIZER_SETTING = "tokenizer_setting"


def tokenizer_setting(default):
    """A field that, with the others so marked, rebuilds the run's tokenizer: a checkpoint's
    description of its model carries these (`tokenizer_fields`)."""
    return field(default=default, metadata={TOKENIZER_SETTING: True})


def tokenizer_fields() -> tuple[str, ...]:
    """The DataConfig fields that describe the tokenizer (what `build_tokenizer` reads), plus
    make_vocab_size_divisible_by, which with them gives the padded vocabulary."""
    return tuple(f.name for f in fields(DataConfig) if f.metadata.get(TOKENIZER_SETTING))


@dataclass
class DataConfig(SequenceLengthConfig):
    """Datasets, splits, sample shaping and tokenizer settings."""

    data_path: Optional[list[str]] = None
    """The weight and prefix list for a set of train, validation, and test datasets which split
    according to --split. The accepted formats are: (1) a single prefix, (2) a list of weight prefix
    pairs e.g. weight1 prefix1 weight2 prefix2, (3) a list of prefixes e.g. prefix1 prefix2. For (3),
    weights are inferred from the lengths of the contributing datasets."""

    split: Optional[str] = None
    """Comma-separated list of proportions for training, validation, and test split. For example the
    split `90,5,5` uses 90 percent of the data for training, 5 for validation and 5 for test. Defaults to
    969, 30, 1 when --data-path is given."""

    train_data_path: Optional[list[str]] = None
    """The weight and prefix list for an independent train dataset (same formats as --data-path).
    Cannot be combined with --split."""

    valid_data_path: Optional[list[str]] = None
    """The weight and prefix list for an independent validation dataset (same formats as
    --data-path). Cannot be combined with --split."""

    test_data_path: Optional[list[str]] = None
    """The weight and prefix list for an independent test dataset (same formats as --data-path).
    Cannot be combined with --split."""

    data_args_path: Optional[str] = None
    """Path to a file whose whitespace-separated contents are used as --data-path."""

    per_split_data_args_path: Optional[str] = None
    """Path to a JSON file {"train": [...], "valid": [...], "test": [...]} used as the per-split data
    paths."""

    data_cache_path: Optional[str] = None
    """Directory for the cached dataset indices. Defaults to <dataset prefix>/cache/GPTDataset_indices
    (a folder named after each prefix, as Megatron does)."""

    mock_data: bool = False
    """Skip data loading and use synthetic documents (for testing and benchmarking)."""

    reset_position_ids: bool = False
    """Reset position ids after end-of-document token."""

    reset_attention_mask: bool = False
    """Reset self attention mask after end-of-document token."""

    eod_mask_loss: bool = False
    """Mask loss for the end of document tokens."""

    create_attention_mask_in_dataloader: bool = True
    """Build the [1, s, s] boolean attention mask in the data loader (Megatron:
    --no-create-attention-mask-in-dataloader turns it off)."""

    mmap_bin_files: bool = True
    """Memory-map the .bin files (--no-mmap-bin-files reads them with file I/O instead)."""

    num_workers: int = 2
    """Dataloader number of workers."""

    dataloader_type: Literal["single", "cyclic", "external"] = "single"
    """Single pass vs multiple pass data loader. `external`: the dataset object is used as the data
    iterator as is."""

    data_sharding: bool = True
    """With --dataloader-type cyclic, give each data-parallel rank its own contiguous part of the
    dataset to shuffle each epoch (Megatron's default); --no-data-sharding shuffles the whole
    dataset once per epoch and deals it out to the ranks in turn."""

    seed: int = 1234
    """Random seed for python, numpy, torch, the model-parallel RNG tracker (each pipeline stage
    adds 100 times its rank) and the dataset shuffles."""

    tokenizer_type: Optional[str] = tokenizer_setting(None)
    """What type of tokenizer to use (GPT2BPETokenizer, BertWordPieceLowerCase, BertWordPieceCase,
    SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer, HuggingFaceTokenizer,
    TikTokenizer, NullTokenizer)."""

    vocab_file: Optional[str] = tokenizer_setting(None)
    """Path to the vocab file."""

    merge_file: Optional[str] = tokenizer_setting(None)
    """Path to the BPE merge file."""

    tokenizer_model: Optional[str] = tokenizer_setting(None)
    """Sentencepiece tokenizer model, HuggingFace model name or directory, or tiktoken JSON file."""

    vocab_size: Optional[int] = tokenizer_setting(None)
    """Size of vocab before EOD or padding (NullTokenizer)."""

    vocab_extra_ids: int = tokenizer_setting(0)
    """Number of additional vocabulary tokens. They are used for span masking in the T5 model."""

    padded_vocab_size: Optional[int] = None
    """Number of rows of the word embedding and the output layer, given instead of padding the
    tokenizer's vocabulary to a multiple of --make-vocab-size-divisible-by x tp (e.g. to match a
    converted checkpoint). Must be at least the tokenizer's vocabulary size and divisible by the
    tensor-parallel size."""

    make_vocab_size_divisible_by: int = tokenizer_setting(128)
    """Pad the vocab size to be divisible by this value (times the tensor-parallel size). This is
    added for computational efficiency reasons."""

    tiktoken_pattern: Optional[str] = tokenizer_setting(None)
    """Which tiktoken pre-tokenization pattern to use: v1 or v2."""

    tiktoken_num_special_tokens: int = tokenizer_setting(1000)
    """Number of special tokens in the tiktoken tokenizer."""

    tiktoken_special_tokens: Optional[list[str]] = tokenizer_setting(None)
    """List of tiktoken special tokens, needs to have ["<unk>", "<s>", "</s>"]."""

    mask_prob: float = 0.15
    """Probability of replacing a token with mask (BERT and T5 masked-language-model data)."""

    short_seq_prob: float = 0.1
    """Probability of producing a short sequence (BERT and T5 sample packing)."""

    encoder_seq_length: Optional[int] = None
    """Maximum encoder sequence length to process (T5). Defaults to --seq-length."""

    decoder_seq_length: Optional[int] = None
    """Maximum decoder sequence length to process (T5)."""

    bert_binary_head: bool = True
    """Train BERT with the sentence-order binary head: samples hold two segments and a label saying
    whether they were swapped (Megatron: --bert-no-binary-head turns it off; samples then hold one
    segment and documents of a single sentence are used too)."""

    def __post_init__(self) -> None:
        if self.tokenizer_type is None and self.vocab_size is not None:
            self.tokenizer_type = "NullTokenizer"  # --vocab-size V alone: token ids 0..V (e.g. --mock-data)
