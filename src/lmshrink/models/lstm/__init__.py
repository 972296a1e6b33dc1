"""Word-level LSTM language models, compatible with PyTorch's word_language_model example.

Vocabulary, corpus and batching follow the example exactly (the vocabulary is built from the train, valid
and test files in that order, one ``<eos>`` per line; ``batchify`` cuts the token stream into B columns;
back-propagation through time over windows of ``bptt`` tokens), so its checkpoints load with the same
word ids. ``RNNModel`` has the example's state-dict keys (``encoder``, ``rnn``, ``decoder``); its LSTM is a
``FactorizedLSTM`` whose W_i / W_h are the compression targets (groups ``W_i`` and ``W_h``).

One module per concern: vocab (Vocabulary), corpus (WordCorpus, load_word_corpus, batchify, get_batch), model
(RNNModel, its state dicts), train (evaluate_lm, train_lm, finetune_lm), checkpoint (the example's checkpoint
files), family (the "word-lstm" model family), zoo (the reference models trained into the cache).

    from lmshrink.models.lstm import reference_model
    loaded = reference_model("ptb-small")   # trains once (minutes), then loads from the cache
"""

from lmshrink.models.lstm.checkpoint import load_example_checkpoint, read_example_checkpoint
from lmshrink.models.lstm.corpus import WordCorpus, batchify, get_batch, load_word_corpus
from lmshrink.models.lstm.family import WORD_LSTM, WordLSTMFamily
from lmshrink.models.lstm.model import LSTMConfig, RNNModel, example_state_dict, model_from_state_dict
from lmshrink.models.lstm.train import TrainConfig, evaluate_lm, finetune_lm, train_lm
from lmshrink.models.lstm.vocab import EOS, UNK, VOCAB_FILE, Vocabulary
from lmshrink.models.lstm.zoo import REFERENCES, ReferenceSpec, reference_corpus, reference_dir, reference_model, train_reference

__all__ = ["EOS", "LSTMConfig", "REFERENCES", "RNNModel", "ReferenceSpec", "TrainConfig", "UNK", "VOCAB_FILE", "Vocabulary",
           "WORD_LSTM", "WordCorpus", "WordLSTMFamily", "batchify", "evaluate_lm", "example_state_dict", "finetune_lm",
           "get_batch", "load_example_checkpoint", "load_word_corpus", "model_from_state_dict", "read_example_checkpoint",
           "reference_corpus", "reference_dir", "reference_model", "train_lm", "train_reference"]
