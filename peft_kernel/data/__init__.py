"""Data shipped with peft-kernel.

``tiny_sentences.jsonl``: a few hundred short, templated English sentences (one JSON
object with a ``"text"`` field per line). It is the default training set of
``peft-kernel finetune``: small enough to train on a laptop CPU in seconds, regular
enough that the loss visibly falls.

``first_party_methods.json``: ``{distribution: [peft_type, ...]}`` for the method plugins
developed with the kernel (``plugins/`` of its repository; a test keeps the two in step).
The unknown-method error suggests ``pip install <distribution>`` only for these names, so
it never points users at a package name that anyone could register.
"""
