'''Conformance entries: vision-language models (CLIP, SigLIP) (joined into ``conformance.ENTRIES``).'''
ENTRIES = []
