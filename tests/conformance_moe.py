'''Conformance entries: mixture-of-experts language models (joined into ``conformance.ENTRIES``).'''
ENTRIES = []
