'''All conformance entries: the base entries of ``conformance.py`` and those of the group modules.'''
import conformance
import conformance_decoders
import conformance_encoders
import conformance_moe
import conformance_multimodal
import conformance_vision

ENTRIES = [
    *conformance.ENTRIES, *conformance_decoders.ENTRIES, *conformance_moe.ENTRIES, *conformance_encoders.ENTRIES,
    *conformance_vision.ENTRIES, *conformance_multimodal.ENTRIES,
]
