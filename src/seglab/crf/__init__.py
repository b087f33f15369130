"""Dense CRF post-processing: a fully connected CRF with mean-field inference over a
permutohedral lattice (Krähenbühl & Koltun 2011; Adams et al. 2010), and its trainable
CRF-as-RNN form (Zheng et al. 2015). Pure PyTorch, batched, any device."""
from seglab.crf.dense import DenseCRF
from seglab.crf.lattice import PermutohedralLattice
from seglab.crf.refine import DEFAULT_CRF_PARAMS, make_crf, parse_crf_params, refine
from seglab.crf.rnn import CRFasRNN

__all__ = ["DEFAULT_CRF_PARAMS", "CRFasRNN", "DenseCRF", "PermutohedralLattice", "make_crf", "parse_crf_params", "refine"]
