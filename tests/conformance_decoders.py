'''Conformance entries: decoder-only language models beyond the LLaMA family and GPT-2, and encoder-decoders (joined into ``conformance.ENTRIES``).'''
ENTRIES = []
