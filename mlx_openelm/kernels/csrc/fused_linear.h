// Decode-shaped products with their neighbours folded in (included by kernels.cpp, inside its
// anonymous namespace, after the product kernels): for <= 8 rows of x,
//
//   y = prologue(x) @ W^T (+ residual)      prologue: none | RMSNorm(x) * g | silu(x[:, :H]) * x[:, H:]
//
// with W float32/bfloat16/float16 or 4/8-bit affine (MLX's packed layout). A decoder layer then is
// five graph nodes instead of about twenty: norm+qkv, attention, out_proj+residual, norm+proj_1,
// swiglu+proj_2+residual. On a 2-core CPU each MLX node costs more to dispatch than these small
// element-wise steps cost to compute. Inference only (no vjp): the model uses it with a KV cache.

enum Prologue { kNone = 0, kRMSNorm = 1, kSwiGLU = 2 };

// x [M, Kin] -> xa [M, K] after the prologue (K = Kin, or Kin / 2 for SwiGLU).
inline void apply_prologue(int pro, const float* x, const float* g, float eps, int64_t M, int64_t Kin, float* xa) {
  const int64_t K = pro == kSwiGLU ? Kin / 2 : Kin;
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * Kin;
    float* o = xa + m * K;
    if (pro == kRMSNorm) {
      float ss = 0.f;
      for (int64_t k = 0; k < K; ++k) ss += r[k] * r[k];
      const float inv = 1.0f / std::sqrt(ss / K + eps);
      for (int64_t k = 0; k < K; ++k) o[k] = r[k] * inv * g[k];
    } else if (pro == kSwiGLU) {
      for (int64_t k = 0; k < K; ++k) {
        const float a = r[k];
        o[k] = a / (1.0f + std::exp(-a)) * r[K + k];
      }
    } else {
      std::memcpy(o, r, K * sizeof(float));
    }
  }
}

class FusedLinear : public mx::UnaryPrimitive {
 public:
  // bits 0: float weights; 4/8: affine quantized (inputs w, scales, biases)
  FusedLinear(mx::Stream s, int pro, float eps, bool residual, int bits, int gs)
      : mx::UnaryPrimitive(s), pro_(pro), eps_(eps), res_(residual), bits_(bits), gs_(gs) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    size_t i = bits_ ? 4 : 2;
    const float* gp = pro_ == kRMSNorm ? inputs[i++].data<float>() : nullptr;
    const float* rp = res_ ? inputs[i++].data<float>() : nullptr;
    auto& enc = encoder_with_new_output(stream(), inputs, out);
    const int64_t N = w.shape(0), K = bits_ ? w.shape(1) * 32 / bits_ : w.shape(1);
    const int64_t Kin = x.shape(-1), M = x.size() / Kin;
    const Affine qa = affine_of(inputs, 2, bits_);
    const void* wp = w.data<void>();
    const mx::Dtype wt = w.dtype();
    enc.dispatch([=, xp = x.data<float>(), op = out.data<float>(), pro = pro_, eps = eps_, bits = bits_, gs = gs_]() {
      std::vector<float> xa(M * K);
      apply_prologue(pro, xp, gp, eps, M, Kin, xa.data());
      product(xa.data(), M, K, N, wt, wp, qa, bits, gs, rp, op);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlx_openelm.kernels.fused_linear runs on the CPU only");
  }
  const char* name() const override { return "OpenELMFusedLinear"; }
  bool is_equivalent(const mx::Primitive&) const override { return false; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& w = inputs[1];
    return {out_shape(inputs[0], w.shape(0))};
  }

 private:
  int pro_;
  float eps_;
  bool res_;
  int bits_, gs_;
};

mx::array fused_linear(const mx::array& x, const mx::array& w, const std::optional<mx::array>& scales,
                       const std::optional<mx::array>& biases, int group_size, int bits, const std::string& prologue,
                       const std::optional<mx::array>& norm_weight, float eps, const std::optional<mx::array>& residual,
                       mx::StreamOrDevice s) {
  auto st = cpu_stream(s);
  int pro = prologue == "rms_norm" ? kRMSNorm : prologue == "swiglu" ? kSwiGLU : prologue == "none" ? kNone : -1;
  if (pro < 0) throw std::invalid_argument("fused_linear: prologue must be none, rms_norm or swiglu");
  if (x.dtype() != mx::float32 || x.ndim() < 1) throw std::invalid_argument("fused_linear: x must be float32");
  if (w.ndim() != 2) throw std::invalid_argument("fused_linear: w must be 2-D");
  const int64_t K = bits ? (int64_t)w.shape(1) * 32 / bits : w.shape(1);
  const int64_t Kin = x.shape(-1);
  if ((pro == kSwiGLU ? Kin / 2 : Kin) != K || (pro == kSwiGLU && Kin % 2))
    throw std::invalid_argument("fused_linear: x's last axis does not match w (SwiGLU: twice w's K)");
  if ((int64_t)x.size() / Kin > 8) throw std::invalid_argument("fused_linear: at most 8 rows");
  auto c = [&](const mx::array& a) { return row_contiguous(a, st); };
  std::vector<mx::array> in{c(x), c(w)};
  if (bits) {
    if (bits != 4 && bits != 8) throw std::invalid_argument("fused_linear: bits must be 0, 4 or 8");
    if (!scales || !biases || !affine_fits(w, *scales, *biases, K, group_size))
      throw std::invalid_argument("fused_linear: quantized w needs uint32 w and scales/biases of its groups "
                                  "(float32, float16 or bfloat16 alike)");
    in.push_back(c(*scales));
    in.push_back(c(*biases));
  } else if (w.dtype() != mx::float32 && w.dtype() != mx::bfloat16 && w.dtype() != mx::float16) {
    throw std::invalid_argument("fused_linear: w must be float32, bfloat16 or float16 (or quantized)");
  }
  if (pro == kRMSNorm) {
    if (!norm_weight || norm_weight->size() != (size_t)K) throw std::invalid_argument("fused_linear: norm_weight of K values");
    in.push_back(c(mx::astype(*norm_weight, mx::float32, st)));
  }
  mx::Shape shape = out_shape(x, w.shape(0));
  if (residual) {
    if (residual->shape() != shape || residual->dtype() != mx::float32)
      throw std::invalid_argument("fused_linear: residual must be float32 of the output's shape");
    in.push_back(c(*residual));
  }
  return mx::array(shape, mx::float32, std::make_shared<FusedLinear>(st, pro, eps, residual.has_value(), bits, group_size),
                   std::move(in));
}
