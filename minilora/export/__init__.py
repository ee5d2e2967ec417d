"""Exports: a trained model or adapter written in another program's format.

``gguf``: one GGUF file for llama.cpp, Ollama and LM Studio (the merged model, or the LoRA
adapter alone), written with the ``gguf`` package; ``ollama``: the Modelfile beside it.
"""
