"""Data shipped with peft-kernel.

``tiny_sentences.jsonl``: a few hundred short, templated English sentences (one JSON
object with a ``"text"`` field per line). It is the default training set of
``peft-kernel finetune``: small enough to train on a laptop CPU in seconds, regular
enough that the loss visibly falls.
"""
