"""ScaLoRA's optimal scales: column scaling, its scalar fallback, none.

In the paper's terms (Zhang et al., arXiv 2510.23818; W = W_pt + s A B,
here a [in, R], b [R, out], G the loss gradient w.r.t. the effective
kernel, g_a = s G b', g_b = s a' G the LoRA gradients): the restarted
factors a~ = a diag(alpha), b~ = diag(beta) b take a gradient step of rate
eta, whose first-order change of the kernel is

    dW~ = -eta (sum_i u_i X_i + v_i Y_i),  X_i = s^2 a_i a_i' G,
                                           Y_i = s^2 G b_i' b_i,

with u = alpha^2, v = beta^2. The L-smooth upper bound of the next loss
(the paper's Assumption 1) is smallest when dW~ is nearest the full
fine-tuning step dW* = -G / L, a least-squares problem in theta = [u; v]:

    min || G / (L eta) - sum_i u_i X_i + v_i Y_i ||_F^2
    =>  K theta = h / (L eta),   K = s^2 [[Kxx, Kxy], [Kxy', Kyy]],

    Kxx = (a'a) o (g_b g_b'),  Kyy = (g_a'g_a) o (b b'),
    Kxy = (a'g_a) o (g_b b'),  h = [rowsums(g_b o g_b); colsums(g_a o g_a)]

(o the elementwise product; <X_i, Y_j> = s^4 (a_i' G b_j')^2 and a' g_a =
g_b b' = s a' G b'): 2R x 2R, from inner products of the factors and their
gradients, O((in + out) R^2), no dense G.

* column: theta = K^-1 h / (L eta) when every entry is positive (they are
  squares); alpha, beta = sqrt(theta) (the sign is free: + is taken).
* scalar (the fallback when the column system has no positive solution):
  alpha, beta the same for every column, u_i = u, v_i = v; the same least
  squares over the two terms X = sum_i X_i = s^2 a a' G and Y = sum_i Y_i:
  P' K P [u; v] = P' h / (L eta) with P = [[1_R, 0], [0, 1_R]], i.e.

    [u; v] = (L eta)^-1 [[p, q], [q, r]]^-1 [||g_b||^2; ||g_a||^2],
    p = s^2 1'Kxx 1 = <X, X>, q = s^2 1'Kxy 1, r = s^2 1'Kyy 1,

  so [alpha; beta] = (L eta)^(-1/2) [u; v]^(1/2) per kernel.
* none: if the scalar [u; v] is not positive either, the kernel is not
  restarted: scales 1 (a plain LoRA step).

A coordinate whose term vanishes (its diagonal entry of K is below 1e-12 x
the largest: B = 0 at LoRA's init makes every Y_i = 0) does not change the
objective; it is free and keeps theta 1 (scale 1), in both systems.
"""
import jax
import jax.numpy as jnp

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST
# A term whose squared norm is below this x the largest one is zero.
_FREE = 1e-12
# The restart kinds, as `scaling` numbers them.
KINDS = ('column', 'scalar', 'none')


def _mm(x, y):
  return jnp.matmul(x, y, precision=_HI)


def system(a: Array, b: Array, g_a: Array, g_b: Array, scale: float
           ) -> tuple[Array, Array]:
  """(K [2R, 2R], h [2R]) of the column least squares (module docstring).
  """
  k_xx = _mm(a.T, a) * _mm(g_b, g_b.T)                    # [R, R]
  k_yy = _mm(g_a.T, g_a) * _mm(b, b.T)
  k_xy = _mm(a.T, g_a) * _mm(g_b, b.T)
  gram = scale**2 * jnp.block([[k_xx, k_xy], [k_xy.T, k_yy]])
  h = jnp.concatenate([jnp.sum(g_b * g_b, 1), jnp.sum(g_a * g_a, 0)])
  return gram, h


def solve(gram: Array, h: Array, l_eta: Array) -> tuple[Array, Array]:
  """(theta [n], valid): gram theta = h / l_eta over the coordinates whose
  term does not vanish, theta 1 on the free ones; valid when every theta is
  finite and positive."""
  diag = jnp.diagonal(gram)
  free = diag <= _FREE * jnp.max(diag)
  gram = jnp.where(free[:, None] | free[None, :], jnp.eye(h.shape[0]), gram)
  theta = jnp.linalg.solve(gram, jnp.where(free, 1.0, h / l_eta))
  return theta, jnp.all(jnp.isfinite(theta) & (theta > 0))


def scaling(a: Array, b: Array, g_a: Array, g_b: Array, scale: float,
            l_eta: Array | float = 1.0) -> tuple[Array, Array, Array]:
  """The optimal scales of one kernel and which kind they are.

  Args:
    a: [in, R]; b: [R, out]; g_a [in, R], g_b [R, out]: the loss gradients
      of a and b at the current point.
    scale: s of the product s A B.
    l_eta: L x eta, the smoothness constant times the step's rate.

  Returns:
    (alpha [R], beta [R], kind): a~ = a diag(alpha), b~ = diag(beta) b;
    kind indexes KINDS (int32 scalar: column, scalar fallback, none).
  """
  r = a.shape[1]
  gram, h = system(a, b, g_a, g_b, scale)
  theta, column = solve(gram, h, l_eta)
  pool = jnp.kron(jnp.eye(2), jnp.ones((r, 1)))           # [2R, 2]
  pair, scalar = solve(_mm(_mm(pool.T, gram), pool), _mm(pool.T, h), l_eta)
  theta = jnp.where(column, theta, jnp.where(scalar, _mm(pool, pair), 1.0))
  kind = jnp.where(column, 0, jnp.where(scalar, 1, 2)).astype(jnp.int32)
  col = jnp.sqrt(theta)
  return col[:r], col[r:], kind
