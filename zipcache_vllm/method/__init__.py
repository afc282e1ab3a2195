"""The ZipCache method as math, with no paging and no serving: the config (presets, paged fitting), the
quantizers (channel-separable tokenwise values, channelwise keys, mixed precision), saliency (probe tokens,
normalized attention scores, quotas) and the segment compressors of the evaluation harness."""
