"""The demo model: a tiny Llama GGUF the project builds itself from its own dialogue corpus.

spec        what the model is (vocabulary, chat template, sizes, training settings), as data
corpus      the shipped dialogues (``data/dialogues.jsonl``); ``corpus_gen`` regenerates them
vocab       SentencePiece BPE vocabulary with byte fallback and chat-turn tokens
train       torch training (the only module here that imports torch)
export      the f16 GGUF, written as llama.cpp's converter writes a llama model
quantize    Q8_0 / Q4_K_M through llama.cpp's quantizer
build       the whole pipeline, run as its own process
demo        ``ensure_demo_model()``: the build key, the cache, the lock
info        GGUF metadata for ``agent model info``
"""
