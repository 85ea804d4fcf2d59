'''Conformance entries: text encoders beyond the BERT family (joined into ``conformance.ENTRIES``).'''
ENTRIES = []
