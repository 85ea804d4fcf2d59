'''Conformance entries: vision transformers beyond the plain ViT (joined into ``conformance.ENTRIES``).'''
ENTRIES = []
