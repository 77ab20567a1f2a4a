"""The encoder-decoder translator (Vaswani et al. 2017) on English -> French number words: data, training,
evaluation and the `picochat translate` command. The model itself is picochat/model/seq2seq.py."""
