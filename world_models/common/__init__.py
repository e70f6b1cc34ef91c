"""Building blocks shared by Dreamer V1, V2 and V3 (never copied between versions).

What differs between the versions is a set of named settings (``config``: the small frozen configs
each module receives), never a version number.

``dists`` (symlog, two-hot, latent distributions, the three KL regularisers), ``networks``
(MLP/CNN encoders and decoders, heads), ``rssm`` (the recurrent state-space model), ``world_model``
(encoder + RSSM + heads and their loss), ``behavior`` (imagination and actor-critic
losses), ``agent`` (parameters, optimisers, the gradient step, acting), ``replay`` (device ring
buffer of sequences) and ``report`` (open-loop predictions written into the run folder).
"""
