"""The systems rcam is compared with (SPEC §8): the seed papers' networks, trained on rcam's data, kept apart from
the product path and sharing its RAW input, entropy coding, container, metrics and evaluation."""

# End-to-end codecs `rcam eval --baselines` accepts besides the cascades (rcam.comparators.baselines.BASELINES): RAW in,
# a real file out, measured as rcam is (RAWtoBit at each λ; rawjxl, JPEG XL on rcam's own planes, at its distances).
END_TO_END = ("rawtobit", "rawjxl")
