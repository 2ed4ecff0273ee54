"""IDE-FSNN: feedback spiking networks trained by implicit differentiation on the equilibrium state."""
from .bptt import BN_MODES, BPTT, METHODS, SURROGATES, gradient_method
from .implicit import GRADIENTS, PHANTOM_FORMS, AdjointSolve, ImplicitGradient, adjoint_solve
from .layers import Connection, Feedback, SpectralScale, VariationalDropout, unit_fanin_init_
from .models import ARCHITECTURES, Architecture, SNNClassifier, build_model, build_snn
from .settings import NETS, NetSettings
from .snn import FeedbackSNN, is_leaky, rate_weights
from .solvers import SOLVERS, Solver, anderson, broyden, fixed_point_iter, get_solver, phantom_steps

__all__ = [
    "ARCHITECTURES", "Architecture", "NETS", "NetSettings", "Connection", "Feedback", "FeedbackSNN", "ImplicitGradient",
    "SNNClassifier", "SOLVERS", "SpectralScale", "VariationalDropout", "broyden", "build_model",
    "build_snn", "fixed_point_iter", "get_solver", "is_leaky", "rate_weights", "unit_fanin_init_",
    "BN_MODES", "BPTT", "METHODS", "SURROGATES", "gradient_method",
    "GRADIENTS", "PHANTOM_FORMS", "AdjointSolve", "adjoint_solve", "Solver", "anderson", "phantom_steps",
]
