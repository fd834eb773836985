"""The five attention-centred methods and the baseline, one module each; each turns a bundle into a plain bundle.

A module registers its method (:mod:`edgevit.methods.registry`); ``edgevit train`` finds every module here.
"""
