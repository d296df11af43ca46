// The layerwise implementation of mlp_loss_grad, mlp_hvp and mlp_maml (see mlp_layerwise.h): the passes of
// common/mlp_passes.h and the recursion of common/mlp_maml_math.h over [T, K, width] tensors with ATen GEMMs, the
// element-wise parts in the kernels of the tensors' device (cpu/mlp_elementwise.cpp, cuda/mlp_elementwise.cu).
#include "layerwise/mlp_layerwise.h"

#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "common/mlp_checks.h"
#include "common/mlp_passes.h"
#include "common/mlp_tasks.h"  // contiguous, per_task_outputs

namespace mamlext {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Device dispatch of the element-wise kernels.

#ifdef MAMLEXT_WITH_CUDA
#define MAMLEXT_ELEMENTWISE(cuda, call)  \
  do {                                   \
    if (cuda) {                          \
      cuda_elementwise::call;            \
    } else {                             \
      cpu_elementwise::call;             \
    }                                    \
  } while (0)
#else
#define MAMLEXT_ELEMENTWISE(cuda, call)                                                           \
  do {                                                                                            \
    TORCH_CHECK(!(cuda), "mamlext: this build has no CUDA kernels (built without CUDA)");         \
    cpu_elementwise::call;                                                                        \
  } while (0)
#endif

// An operand of a maml_update on the host: element (t, s) is at t.data + offset + t * task_stride + s * elem_stride;
// tensor null: the value 0.
struct HostOperand {
  const at::Tensor* tensor = nullptr;
  int64_t offset = 0, task_stride = 0, elem_stride = 1;

  template <typename scalar_t>
  TaskOperand<const scalar_t*> get() const {
    TaskOperand<const scalar_t*> o;
    if (tensor != nullptr) o.ptr = tensor->data_ptr<scalar_t>() + offset;
    o.task_stride = task_stride;
    o.elem_stride = elem_stride;
    return o;
  }
};

// The per-call state: the network's configuration, T, the device and dtype; runs the passes.
class LayerwiseMlp {
 public:
  LayerwiseMlp(const MlpConfig& config, int64_t tasks, const at::Tensor& like)
      : c_(config), tasks_(tasks), cuda_(like.is_cuda()), dtype_(like.scalar_type()) {
    TORCH_CHECK(like.device().type() == at::kCPU || like.is_cuda(),
                "mamlext: the layerwise MLP ops run on CPU and CUDA tensors, got ", like.device());
  }

  // Per-layer values of one pass over [T, K, *] rows (see common/mlp_passes.h MlpActivations), and its loss's
  // targets and rows' weights [T, K] (undefined: all 1).
  struct Pass {
    std::vector<at::Tensor> z, h, dz, dh, rz, rh;
    at::Tensor y, weights;
  };

  // Forward: z_l = h_{l-1} W_l^T + b_l, h_l = f(z_l).
  void forward(const at::Tensor& x, const std::vector<at::Tensor>& p, Pass& a) const {
    const int L = c_.dims.layers;
    a = Pass();
    a.z.resize(L);
    a.h.resize(L);
    a.dz.resize(L);
    a.dh.resize(L);
    for (int l = 0; l < L; ++l) {
      a.z[l] = linear(l == 0 ? x : a.h[l - 1], p[2 * l], p[2 * l + 1]);
      if (l + 1 < L) a.h[l] = activation_forward(a.z[l]);
    }
  }

  // The loss of the network's output against y with the rows' weights ([T] per task) and the backward pass: fills
  // a.dz and a.dh and, when grads is not null, the per-task parameter gradients [T, *S_i] (the loss parameter's
  // included). weights: [T, K], contiguous, or undefined.
  at::Tensor loss_backward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weights,
                           const std::vector<at::Tensor>& p, Pass& a, std::vector<at::Tensor>* grads) const {
    const int L = c_.dims.layers;
    at::Tensor losses = at::empty({tasks_}, a.z[L - 1].options());
    a.y = y;
    a.weights = weights;
    at::Tensor loss_param_grad;
    if (grads != nullptr) {
      grads->resize(c_.dims.num_params());
      if (c_.dims.has_loss_param()) loss_param_grad = loss_param_output((*grads)[2 * L], losses.options());
    }
    a.dz[L - 1] = loss_forward_backward(a.z[L - 1], a, p, loss_param_grad, losses);
    for (int l = L - 1; l >= 0; --l) {
      const at::Tensor& in = l == 0 ? x : a.h[l - 1];
      if (grads != nullptr) param_grad(a.dz[l], in, (*grads)[2 * l], (*grads)[2 * l + 1]);
      if (l > 0) {
        a.dh[l - 1] = input_grad(a.dz[l], p[2 * l]);
        a.dz[l - 1] = activation_backward(a.z[l - 1], a.h[l - 1], a.dh[l - 1]);
      }
    }
    return losses;
  }

  // H v by the R-forward and R-backward passes, after forward and loss_backward at p filled a; v per task. Writes
  // into hv's tensors where they are defined (reused buffers), else allocates them. gauss_newton: J^T H_loss J v
  // instead (the R-backward pass without the network's own curvature: a plain backward pass of R{dL/dz}).
  void hessian_vector(const at::Tensor& x, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& v,
                      Pass& a, std::vector<at::Tensor>& hv, bool gauss_newton = false) const {
    const int L = c_.dims.layers;
    a.rz.assign(L, at::Tensor());
    a.rh.assign(L, at::Tensor());
    for (int l = 0; l < L; ++l) {
      a.rz[l] = linear(l == 0 ? x : a.h[l - 1], v[2 * l], v[2 * l + 1]);  // h VW^T + Vb
      if (l > 0) linear_add(a.rz[l], a.rh[l - 1], p[2 * l]);            // + Rh W^T
      if (l + 1 < L) a.rh[l] = activation_backward(a.z[l], a.h[l], a.rz[l]);
    }
    hv.resize(c_.dims.num_params());
    const at::Tensor param_hv =
        c_.dims.has_loss_param() ? loss_param_output(hv[2 * L], a.z[L - 1].options()) : at::Tensor();
    at::Tensor rdz = loss_r_backward(a, p, v, param_hv, gauss_newton);
    for (int l = L - 1; l >= 0; --l) {
      const at::Tensor& in = l == 0 ? x : a.h[l - 1];
      param_grad(rdz, in, hv[2 * l], hv[2 * l + 1]);  // Rdz^T h, sum_k Rdz
      if (l == 0) break;
      at::Tensor rdh = input_grad(rdz, p[2 * l]);  // Rdz W
      if (gauss_newton) {
        rdz = activation_backward(a.z[l - 1], a.h[l - 1], rdh);
        continue;
      }
      hv[2 * l].baddbmm_(a.dz[l].transpose(1, 2), a.rh[l - 1]);  // + dz^T Rh
      input_grad_add(rdh, a.dz[l], v[2 * l]);                    // + dz VW
      activation_r_backward(a.z[l - 1], a.h[l - 1], a.dh[l - 1], a.rz[l - 1], rdh);
      rdz = rdh;
    }
  }

  // out(t, s) = maml_update(a, b, c, w) over a [T, S] parameter; out at out_tensor + out_offset with task stride
  // out_task_stride.
  void maml_update(MamlUpdate update, int64_t per_task, const at::Tensor& out_tensor, int64_t out_offset,
                   int64_t out_task_stride, HostOperand a, HostOperand b, HostOperand c, double w) const {
    if (tasks_ == 0 || per_task == 0) return;
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_maml_update", [&] {
      MamlUpdateArgs<scalar_t> m;
      m.update = update;
      m.tasks = tasks_;
      m.per_task = per_task;
      m.out.ptr = out_tensor.data_ptr<scalar_t>() + out_offset;
      m.out.task_stride = out_task_stride;
      m.out.elem_stride = 1;
      m.a = a.get<scalar_t>();
      m.b = b.get<scalar_t>();
      m.c = c.get<scalar_t>();
      m.w = static_cast<scalar_t>(w);
      MAMLEXT_ELEMENTWISE(cuda_, maml_update<scalar_t>(m));
    });
  }

 private:
  // z = in W^T + b over [T, K, *]: W [out, in] (shared: one GEMM over the T * K rows) or [T, out, in] (per task),
  // b [out] or [T, out].
  static at::Tensor linear(const at::Tensor& in, const at::Tensor& W, const at::Tensor& b) {
    const int64_t T = in.size(0), K = in.size(1), O = W.size(-2);
    if (W.dim() == 2) {
      const at::Tensor in2 = in.reshape({T * K, in.size(2)});
      if (b.dim() == 1) return at::addmm(b, in2, W.t()).view({T, K, O});
      return at::mm(in2, W.t()).view({T, K, O}).add_(b.unsqueeze(1));
    }
    return at::baddbmm(b.dim() == 1 ? b.view({1, 1, O}) : b.unsqueeze(1), in, W.transpose(1, 2));
  }

  // gW = d^T in [T, out, in], gb = sum_k d [T, out] for d [T, K, out]: into gW, gb when defined, else new tensors.
  static void param_grad(const at::Tensor& d, const at::Tensor& in, at::Tensor& gW, at::Tensor& gb) {
    if (gW.defined()) {
      at::bmm_out(gW, d.transpose(1, 2), in);
    } else {
      gW = at::bmm(d.transpose(1, 2), in);
    }
    if (gb.defined()) {
      at::sum_out(gb, d, 1);
    } else {
      gb = d.sum(1);
    }
  }

  // out += in W^T.
  static void linear_add(at::Tensor& out, const at::Tensor& in, const at::Tensor& W) {
    const int64_t T = in.size(0), K = in.size(1);
    if (W.dim() == 2) {
      out.view({T * K, W.size(0)}).addmm_(in.reshape({T * K, in.size(2)}), W.t());
    } else {
      out.baddbmm_(in, W.transpose(1, 2));
    }
  }

  // d W: the gradient w.r.t. a layer's input, d [T, K, out].
  static at::Tensor input_grad(const at::Tensor& d, const at::Tensor& W) {
    const int64_t T = d.size(0), K = d.size(1);
    if (W.dim() == 2) return at::mm(d.reshape({T * K, d.size(2)}), W).view({T, K, W.size(1)});
    return at::bmm(d, W);
  }

  // out += d W.
  static void input_grad_add(at::Tensor& out, const at::Tensor& d, const at::Tensor& W) {
    const int64_t T = d.size(0), K = d.size(1);
    if (W.dim() == 2) {
      out.view({T * K, W.size(1)}).addmm_(d.reshape({T * K, d.size(2)}), W);
    } else {
      out.baddbmm_(d, W);
    }
  }

  at::Tensor activation_forward(const at::Tensor& z) const {
    at::Tensor h = at::empty_like(z);
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_activation_forward", [&] {
      MAMLEXT_ELEMENTWISE(cuda_, activation_forward<scalar_t>(c_.activation, static_cast<scalar_t>(c_.act_param),
                                                              z.numel(), z.data_ptr<scalar_t>(),
                                                              h.data_ptr<scalar_t>()));
    });
    return h;
  }

  // f'(z) * in.
  at::Tensor activation_backward(const at::Tensor& z, const at::Tensor& h, const at::Tensor& in) const {
    at::Tensor out = at::empty_like(z);
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_activation_backward", [&] {
      MAMLEXT_ELEMENTWISE(cuda_, activation_backward<scalar_t>(
                                     c_.activation, static_cast<scalar_t>(c_.act_param), z.numel(),
                                     z.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(),
                                     out.data_ptr<scalar_t>()));
    });
    return out;
  }

  // rdz = f'(z) * rdz + f''(z) * dh * rz, in place.
  void activation_r_backward(const at::Tensor& z, const at::Tensor& h, const at::Tensor& dh, const at::Tensor& rz,
                             at::Tensor& rdz) const {
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_activation_r_backward", [&] {
      MAMLEXT_ELEMENTWISE(cuda_, activation_r_backward<scalar_t>(
                                     c_.activation, static_cast<scalar_t>(c_.act_param), z.numel(),
                                     z.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(),
                                     rz.data_ptr<scalar_t>(), rdz.data_ptr<scalar_t>()));
    });
  }

  // The loss parameter's output [T, out] (its gradient or its part of H v): `out` when defined (a reused buffer),
  // else a new tensor stored there.
  at::Tensor loss_param_output(at::Tensor& out, const at::TensorOptions& options) const {
    if (!out.defined()) out = at::empty({tasks_, c_.dims.loss_param_numel}, options);
    return out;
  }

  // The loss parameters of p (and v) as the element-wise kernels read them, derivatives into out (or nowhere).
  template <typename scalar_t>
  TaskLossParams<scalar_t> loss_params(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>* v,
                                       const at::Tensor& out) const {
    TaskLossParams<scalar_t> params;
    if (!c_.dims.has_loss_param()) return params;
    const at::Tensor& value = p[2 * c_.dims.layers];
    params.value = value.data_ptr<scalar_t>();
    params.value_stride = value.dim() == 2 ? c_.dims.loss_param_numel : 0;
    params.stride = c_.dims.loss_param_numel;
    if (v != nullptr) params.direction = (*v)[2 * c_.dims.layers].data_ptr<scalar_t>();
    if (out.defined()) params.out = out.data_ptr<scalar_t>();
    return params;
  }

  // Per task losses of z against a's targets into `losses` (and the loss parameter's gradient into param_grad when
  // defined); returns dL/dz.
  at::Tensor loss_forward_backward(const at::Tensor& z, const Pass& a, const std::vector<at::Tensor>& p,
                                   const at::Tensor& param_grad, at::Tensor& losses) const {
    at::Tensor dz = at::empty_like(z);
    const int64_t K = z.size(1), O = z.size(2);
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_loss", [&] {
      MAMLEXT_ELEMENTWISE(cuda_, loss_forward_backward<scalar_t>(
                                     c_.loss, tasks_, K, O, z.data_ptr<scalar_t>(),
                                     task_targets<scalar_t>(a.y, c_.loss, a.weights),
                                     loss_params<scalar_t>(p, nullptr, param_grad), losses.data_ptr<scalar_t>(),
                                     dz.data_ptr<scalar_t>()));
    });
    return dz;
  }

  // R{dL/dz} of a's loss along a.rz (and the loss parameter's part of H v into param_hv when defined).
  at::Tensor loss_r_backward(const Pass& a, const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& v,
                             const at::Tensor& param_hv, bool fisher) const {
    const at::Tensor& z = a.z[c_.dims.layers - 1];
    const at::Tensor& rz = a.rz[c_.dims.layers - 1];
    at::Tensor rdz = at::empty_like(z);
    const int64_t K = z.size(1), O = z.size(2);
    AT_DISPATCH_FLOATING_TYPES(dtype_, "mlp_layerwise_loss_r", [&] {
      MAMLEXT_ELEMENTWISE(cuda_, loss_r_backward<scalar_t>(c_.loss, tasks_, K, O, z.data_ptr<scalar_t>(),
                                                           task_targets<scalar_t>(a.y, c_.loss, a.weights),
                                                           loss_params<scalar_t>(p, &v, param_hv), fisher,
                                                           rz.data_ptr<scalar_t>(), rdz.data_ptr<scalar_t>()));
    });
    return rdz;
  }

  MlpConfig c_;
  int64_t tasks_;
  bool cuda_;
  at::ScalarType dtype_;
};

std::vector<int64_t> with_tasks(int64_t tasks, at::IntArrayRef shape) {
  std::vector<int64_t> out{tasks};
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

// The ops run ATen ops on their inputs: no autograd graph (and no autograd / ADInplaceOrView dispatch) inside.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_loss_grad_layerwise(at::TensorList params, const at::Tensor& x,
                                                                      const at::Tensor& y, int64_t activation,
                                                                      double act_param, int64_t loss,
                                                                      const std::optional<at::Tensor>& weights) {
  const MlpCall call = check_mlp_loss_grad("mlp_loss_grad", params, x, y, activation, act_param, loss, weights);
  const c10::OptionalDeviceGuard guard(x.device());
  const BelowAutograd below_autograd;
  const int64_t tasks = call.tasks;
  if (tasks == 0) return {at::empty({0}, x.options()), per_task_outputs(params, call.per_task, 0, x.options())};
  const LayerwiseMlp net(call.config, tasks, x);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const std::vector<at::Tensor> ps = contiguous(params);
  LayerwiseMlp::Pass pass;
  std::vector<at::Tensor> grads;
  net.forward(xc, ps, pass);
  at::Tensor losses = net.loss_backward(xc, yc, contiguous_or_undefined(weights), ps, pass, &grads);
  return {losses, grads};
}

std::vector<at::Tensor> mlp_hvp_layerwise(at::TensorList params, at::TensorList vectors, const at::Tensor& x,
                                        const at::Tensor& y, int64_t activation, double act_param, int64_t loss,
                                        const std::optional<at::Tensor>& weights, bool gauss_newton) {
  const MlpCall call = check_mlp_loss_grad("mlp_hvp", params, x, y, activation, act_param, loss, weights);
  check_mlp_vectors("mlp_hvp", vectors, params, call, x);
  const c10::OptionalDeviceGuard guard(x.device());
  const BelowAutograd below_autograd;
  const int64_t tasks = call.tasks;
  if (tasks == 0) return per_task_outputs(params, call.per_task, 0, x.options());
  const LayerwiseMlp net(call.config, tasks, x);
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const std::vector<at::Tensor> ps = contiguous(params), vs = contiguous(vectors);
  LayerwiseMlp::Pass pass;
  net.forward(xc, ps, pass);
  net.loss_backward(xc, yc, contiguous_or_undefined(weights), ps, pass, nullptr);
  std::vector<at::Tensor> hv;
  net.hessian_vector(xc, ps, vs, pass, hv, gauss_newton);
  return hv;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_maml_layerwise(
    at::TensorList params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
    at::TensorList lrs, const at::Tensor& step_weights, bool first_order, int64_t activation, double act_param,
    int64_t loss, const MamlRowWeights& row_weights) {
  const MlpMamlCall checked = check_mlp_maml("mlp_maml", params, xs, ys, xq, yq, lrs, step_weights, activation,
                                             act_param, loss, row_weights);
  const c10::OptionalDeviceGuard guard(xs.device());
  const BelowAutograd below_autograd;
  const MlpCall& call = checked.call;
  const MlpDims& d = call.config.dims;
  const int64_t tasks = call.tasks, steps = checked.steps;
  const int P = d.num_params();
  const auto options = params[0].options();
  std::vector<at::Tensor> meta_grads, lr_grads;
  for (int i = 0; i < P; ++i) {
    meta_grads.push_back(at::empty(with_tasks(tasks, params[i].sizes()), options));
    lr_grads.push_back(at::empty(with_tasks(tasks, lrs[i].sizes()), options));
  }
  at::Tensor query_losses = at::zeros({tasks}, options);
  if (tasks == 0) return {query_losses, meta_grads, lr_grads};

  // Step weights on the CPU (whatever the params' device) are read here, so that the query passes of zero weight
  // are skipped. On the GPU they are not read (that would wait for the GPU and break CUDA-graph capture): every
  // step's query pass runs and is scaled on the device.
  const bool host_weights = step_weights.device().is_cpu();
  const at::Tensor weights = step_weights.reshape({-1}).to(params[0].scalar_type());
  const at::Tensor host = host_weights ? weights.to(at::kDouble).contiguous() : at::Tensor();
  // The weight of L_query(theta_k) as the updates below apply it: 1 where the device scales the gradient itself.
  auto step_weight = [&](int64_t k) { return host_weights ? host.data_ptr<double>()[k - 1] : 1.0; };

  const LayerwiseMlp net(call.config, tasks, params[0]);
  const at::Tensor xsc = xs.contiguous(), ysc = ys.contiguous(), xqc = xq.contiguous(), yqc = yq.contiguous();
  const at::Tensor support_weights = contiguous_or_undefined(row_weights.support);
  const at::Tensor query_weights = contiguous_or_undefined(row_weights.query);
  const std::vector<at::Tensor> lrc = contiguous(lrs);
  // theta[k]: theta_k, P tensors ([S_i] for k = 0, the shared meta-parameters; [T, *S_i] after); g[k]: g_k.
  std::vector<std::vector<at::Tensor>> theta(steps + 1), g(steps);
  theta[0] = contiguous(params);

  auto rate = [&](int i, int64_t k) {  // alpha_k of params[i]: one value, or [S_i]
    HostOperand o;
    o.tensor = &lrc[i];
    const int64_t n = d.param_numel(i);
    o.offset = checked.lr_per_element[i] ? k * n : k;
    o.elem_stride = checked.lr_per_element[i] ? 1 : 0;
    return o;
  };
  auto per_task = [&](const at::Tensor& t, int i) {  // a [T, *S_i] tensor, or [S_i] shared
    HostOperand o;
    o.tensor = &t;
    o.task_stride = t.dim() > params[i].dim() ? d.param_numel(i) : 0;
    return o;
  };

  // Inner loop. The support pass of the last step (theta_{N-1}) stays in `support` for the first HVP.
  LayerwiseMlp::Pass support;
  for (int64_t k = 0; k < steps; ++k) {
    net.forward(xsc, theta[k], support);
    net.loss_backward(xsc, ysc, support_weights, theta[k], support, &g[k]);
    for (int i = 0; i < P; ++i) {
      const int64_t n = d.param_numel(i);
      theta[k + 1].push_back(at::empty(with_tasks(tasks, params[i].sizes()), options));
      net.maml_update(MamlUpdate::kSgdStep, n, theta[k + 1][i], 0, n, per_task(theta[k][i], i), per_task(g[k][i], i),
                      rate(i, k), 0.0);
    }
  }

  // The reverse recursion's [T, *S_i] temporaries are allocated once and reused by every step: fresh allocations of
  // this size cost more (page faults on the CPU) than the element-wise passes over them.
  std::vector<at::Tensor> qg, hv, direction;

  // w_k L_query(theta_k) into query_losses; grad L_query(theta_k) into qg, times w_k for device weights.
  auto query_grad = [&](int64_t k) {
    LayerwiseMlp::Pass q;
    net.forward(xqc, theta[k], q);
    const at::Tensor losses = net.loss_backward(xqc, yqc, query_weights, theta[k], q, &qg);
    if (host_weights) {
      query_losses.add_(losses, step_weight(k));
      return;
    }
    const at::Tensor w_k = weights.select(0, k - 1);
    query_losses.add_(losses * w_k);
    for (auto& t : qg) t.mul_(w_k);
  };

  std::vector<at::Tensor>& v = meta_grads;  // the running v_k
  if (step_weight(steps) != 0.0) {
    query_grad(steps);
    for (int i = 0; i < P; ++i) {  // v_N = w_N grad L_query(theta_N)
      net.maml_update(MamlUpdate::kVUpdate, d.param_numel(i), v[i], 0, d.param_numel(i), HostOperand(),
                      HostOperand(), per_task(qg[i], i), step_weight(steps));
    }
  } else {
    for (auto& t : v) t.zero_();
  }

  for (int64_t k = steps - 1; k >= 0; --k) {
    for (int i = 0; i < P; ++i) {  // lr_grad_k = -v_{k+1} * g_k, summed over the tensor for a per-tensor rate
      const int64_t n = d.param_numel(i);
      if (checked.lr_per_element[i]) {
        net.maml_update(MamlUpdate::kLrGrad, n, lr_grads[i], k * n, steps * n, per_task(v[i], i),
                        per_task(g[k][i], i), HostOperand(), 0.0);
      } else {  // -<v_t, g_t> per task, as one bmm of [1, n] x [n, 1] products
        lr_grads[i].select(1, k).copy_(
            at::bmm(v[i].view({tasks, 1, n}), g[k][i].view({tasks, n, 1})).view({tasks}).neg_());
      }
    }
    if (!first_order) {  // H_support(theta_k) (alpha_k * v_{k+1})
      if (k != steps - 1) {
        net.forward(xsc, theta[k], support);
        net.loss_backward(xsc, ysc, support_weights, theta[k], support, nullptr);
      }
      for (int i = 0; i < P && direction.size() < static_cast<size_t>(P); ++i) {
        direction.push_back(at::empty(with_tasks(tasks, params[i].sizes()), options));
      }
      for (int i = 0; i < P; ++i) {
        const int64_t n = d.param_numel(i);
        net.maml_update(MamlUpdate::kDirection, n, direction[i], 0, n, per_task(v[i], i), HostOperand(), rate(i, k),
                        0.0);
      }
      net.hessian_vector(xsc, theta[k], direction, support, hv);
    }
    const double weight = k >= 1 ? step_weight(k) : 0.0;
    if (weight != 0.0) query_grad(k);
    if (first_order && weight == 0.0) continue;
    for (int i = 0; i < P; ++i) {  // v_k = v_{k+1} - H(alpha_k * v_{k+1}) + w_k grad L_query(theta_k)
      const int64_t n = d.param_numel(i);
      net.maml_update(MamlUpdate::kVUpdate, n, v[i], 0, n, per_task(v[i], i),
                      first_order ? HostOperand() : per_task(hv[i], i),
                      weight == 0.0 ? HostOperand() : per_task(qg[i], i), weight);
    }
  }
  return {query_losses, meta_grads, lr_grads};
}

}  // namespace mamlext
