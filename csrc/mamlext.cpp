// The Python module mamlext._C and every op's schema. Kernels live in cpu/ and cuda/, shared math in common/.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef MAMLEXT_CUDA_ARCHS
#define MAMLEXT_CUDA_ARCHS ""
#endif
#ifdef MAMLEXT_WITH_CUDA
#define MAMLEXT_WITH_CUDA_FLAG true
#else
#define MAMLEXT_WITH_CUDA_FLAG false
#endif

TORCH_LIBRARY(mamlext, m) {
  // out[i][t] = params[i][t, or shared] - lr * grads[i][t] for all tasks t; lr a float, or per parameter a
  // scalar tensor or a tensor of the parameter's shape.
  m.def("task_sgd(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]");
  m.def("task_sgd.tensor_lr(Tensor[] params, Tensor[] grads, Tensor[] lr) -> Tensor[]");
  // Per task loss of an MLP (params [W_1, b_1, ..., W_L, b_L], each shared or per task) and its gradient; weights
  // [T, K]: each row's weight in the loss (common/losses.h).
  m.def("mlp_loss_grad(Tensor[] params, Tensor x, Tensor y, int activation, float act_param, int loss, "
        "Tensor? weights=None) -> (Tensor, Tensor[])");
  // Per task Hessian-vector product H_t v_t of the MLP loss, by Pearlmutter's R-operator; gauss_newton: the
  // Gauss-Newton product J_t^T H_loss J_t v_t instead (for cross-entropy, the categorical policy's Fisher).
  m.def("mlp_hvp(Tensor[] params, Tensor[] vectors, Tensor x, Tensor y, int activation, float act_param, int loss, "
        "Tensor? weights=None, bool gauss_newton=False) -> Tensor[]");
  // Fused MAML of an MLP: N inner SGD steps per task, weighted query losses, per task meta- and rate gradients.
  // support_weights [T, Ks], query_weights [T, Kq]: the rows' weights in the support and query losses.
  m.def("mlp_maml(Tensor[] params, Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] lrs, Tensor step_weights, "
        "bool first_order, int activation, float act_param, int loss, Tensor? support_weights=None, "
        "Tensor? query_weights=None) -> (Tensor, Tensor[], Tensor[])");
  // The three ops above on a chosen implementation path, for tests (the public ops run path "auto"). On the CPU:
  // per_task, layerwise, or team (the per-task math on team_threads std::threads per task, split as the CUDA block
  // kernel splits it); on CUDA: block, block_global or layerwise. team_threads is for path team only.
  m.def("_mlp_loss_grad_path(Tensor[] params, Tensor x, Tensor y, int activation, float act_param, int loss, "
        "str path, int team_threads=0, Tensor? weights=None) -> (Tensor, Tensor[])");
  m.def("_mlp_hvp_path(Tensor[] params, Tensor[] vectors, Tensor x, Tensor y, int activation, float act_param, "
        "int loss, str path, int team_threads=0, Tensor? weights=None, bool gauss_newton=False) -> Tensor[]");
  m.def("_mlp_maml_path(Tensor[] params, Tensor xs, Tensor ys, Tensor xq, Tensor yq, Tensor[] lrs, "
        "Tensor step_weights, bool first_order, int activation, float act_param, int loss, str path, "
        "int team_threads=0, Tensor? support_weights=None, Tensor? query_weights=None) -> (Tensor, Tensor[], "
        "Tensor[])");
  // mlp_loss_grad that also writes each task's passes (z, h, dz, dh) into `passes`, a contiguous [T, 4 K W] buffer
  // (reused across calls by its caller: a fresh one of this size costs page faults), and mlp_hvp that reads them
  // (_mlp_passes' at the same params, x, y, weights) instead of recomputing them; CPU only, for mamlext.rl's
  // conjugate gradient (mamlext.rl.passes.FusedPolicyPasses holds them with what they were computed from).
  m.def("_mlp_passes(Tensor[] params, Tensor x, Tensor y, int activation, float act_param, int loss, "
        "Tensor? weights, Tensor(a!) passes) -> (Tensor, Tensor[])");
  m.def("_mlp_hvp_from_passes(Tensor[] params, Tensor[] vectors, Tensor x, Tensor y, Tensor passes, int activation, "
        "float act_param, int loss, Tensor? weights=None, bool gauss_newton=False) -> Tensor[]");
  // One step of MAML's reverse recursion for any model: v_next = v - hv (per task, or summed over tasks) and,
  // when grads (the support gradients) are given, the rate gradient lr_grads = -sum_t grads_t * v_t.
  m.def("maml_reverse_step(Tensor[] v, Tensor[] hv, Tensor[] grads, bool sum_tasks) -> (Tensor[], Tensor[])");
  // One MLP (params as above, shared) on one batch of rows x [K, in], and its first and second derivatives: the
  // layers of mamlext.nn.FusedMLP. mlp_forward returns the output and the hidden layers' z and h (for the
  // backward passes); mlp_backward the gradients of params and, when input_grad, of x, from grad_out = dL/dout;
  // mlp_backward_backward the gradients of <grad_param_grads, param grads> + <grad_grad_x, grad x> w.r.t.
  // params, x (when input_grad) and grad_out.
  m.def("mlp_forward(Tensor[] params, Tensor x, int activation, float act_param) -> (Tensor, Tensor)");
  m.def("mlp_backward(Tensor[] params, Tensor x, Tensor activations, Tensor grad_out, int activation, "
        "float act_param, bool input_grad) -> (Tensor[], Tensor)");
  m.def("mlp_backward_backward(Tensor[] params, Tensor x, Tensor activations, Tensor grad_out, "
        "Tensor[] grad_param_grads, Tensor? grad_grad_x, int activation, float act_param, bool input_grad) "
        "-> (Tensor[], Tensor, Tensor)");
  // A per-task learner's (mamlext.MAML's) copy of its parameters and its inner SGD step out_i = params_i - lr *
  // grads_i: one autograd node for the whole list.
  m.def("clone_tensors(Tensor[] tensors) -> Tensor[]");
  m.def("sgd_update(Tensor[] params, Tensor[] grads, float lr) -> Tensor[]");
}

namespace {

// task_sgd and maml_reverse_step take all their tensors in lists. With every list empty the dispatcher has no
// tensor to pick a kernel by and uses this CompositeExplicitAutograd one: empty in, empty out. It also serves
// tensors on a device with no kernel of ours, with an error that says so.
void lists_only_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  for (const auto& arg : torch::jit::last(*stack, num_args)) {
    if (arg.isTensorList() && !arg.toTensorList().empty()) {
      const at::Tensor first = arg.toTensorList().get(0);
      TORCH_CHECK(false, schema.name(), ": no mamlext kernel serves tensors on ", first.device(),
                  " (this build has kernels for the CPU", MAMLEXT_WITH_CUDA_FLAG ? " and CUDA" : "", ")");
    }
  }
  torch::jit::drop(*stack, num_args);
  for (size_t i = 0; i < schema.returns().size(); ++i) stack->emplace_back(c10::List<at::Tensor>());
}

// torch.func.vmap reaches the ops through this key: say what to do instead of "Batching rule not implemented".
void no_vmap_kernel(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, op.schema().name(), ": torch.func.vmap over mamlext ops is not supported: each op already runs "
              "every task of a meta-batch at once. Stack the tasks along the leading task dimension T of its tensors "
              "instead of vmapping over them.");
}

}  // namespace

TORCH_LIBRARY_IMPL(mamlext, CompositeExplicitAutograd, m) {
  for (const char* name : {"task_sgd", "task_sgd.tensor_lr", "maml_reverse_step"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&lists_only_kernel>());
  }
}

TORCH_LIBRARY_IMPL(mamlext, FuncTorchBatched, m) {
  for (const char* name : {"task_sgd", "task_sgd.tensor_lr", "mlp_loss_grad", "mlp_hvp", "mlp_maml",
                           "_mlp_loss_grad_path", "_mlp_hvp_path", "_mlp_maml_path", "_mlp_passes",
                           "_mlp_hvp_from_passes", "maml_reverse_step",
                           "mlp_forward", "mlp_backward", "mlp_backward_backward", "clone_tensors", "sgd_update"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&no_vmap_kernel>());
  }
}

namespace {

// Which device types ("cpu", "cuda") each op has kernels for, as this build registered them: the layer ops have
// CPU kernels only, and an op with one device-generic kernel (CompositeExplicitAutograd) serves every device.
pybind11::dict op_kernels() {
  auto& dispatcher = c10::Dispatcher::singleton();
  pybind11::dict kernels;
  for (const auto& name : dispatcher.getAllOpNames()) {
    const std::string prefix = "mamlext::";
    if (name.name.rfind(prefix, 0) != 0) continue;
    const auto op = dispatcher.findSchema(name);
    if (!op.has_value()) continue;
    const bool cpu = op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    const bool cuda = op->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    const bool generic = !cpu && !cuda && op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd);
    pybind11::list devices;
    if (cpu || generic) devices.append("cpu");
    if (cuda || generic) devices.append("cuda");
    std::string key = name.name.substr(prefix.size());
    if (!name.overload_name.empty()) key += "." + name.overload_name;
    kernels[pybind11::str(key)] = devices;
  }
  return kernels;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["kernels"] = op_kernels();
  info["cuda"] = MAMLEXT_WITH_CUDA_FLAG;
  info["cuda_archs"] = std::string(MAMLEXT_CUDA_ARCHS);
  info["debug"] = static_cast<bool>(MAMLEXT_DEBUG);
  info["torch_version"] = std::string(MAMLEXT_TORCH_VERSION);
  return info;
}

// task_sgd through the dispatcher (autograd, device kernels) for eager calls from mamlext.ops: the same op as
// torch.ops.mamlext.task_sgd without the boxing of its arguments, which costs about as much as a small update.
std::vector<at::Tensor> task_sgd_eager(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                       double lr) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::task_sgd", "").typed<
      std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>();
  return op.call(params, grads, lr);
}

std::vector<at::Tensor> task_sgd_tensor_lr_eager(const std::vector<at::Tensor>& params,
                                                 const std::vector<at::Tensor>& grads,
                                                 const std::vector<at::Tensor>& lr) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::task_sgd", "tensor_lr").typed<
      std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList)>();
  return op.call(params, grads, lr);
}

// mlp_forward through the dispatcher (autograd, kernels) for eager calls from mamlext.ops: a learner's forward in
// mamlext.MAML's per-task loop, where torch.ops' argument boxing is a sizeable part of the call.
std::tuple<at::Tensor, at::Tensor> mlp_forward_eager(const std::vector<at::Tensor>& params, const at::Tensor& x,
                                                     int64_t activation, double act_param) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::mlp_forward", "").typed<
      std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, int64_t, double)>();
  return op.call(params, x, activation, act_param);
}

std::vector<at::Tensor> clone_tensors_eager(const std::vector<at::Tensor>& tensors) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::clone_tensors", "").typed<
      std::vector<at::Tensor>(at::TensorList)>();
  return op.call(tensors);
}

std::vector<at::Tensor> sgd_update_eager(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                         double lr) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mamlext::sgd_update", "").typed<
      std::vector<at::Tensor>(at::TensorList, at::TensorList, double)>();
  return op.call(params, grads, lr);
}

}  // namespace

namespace mamlext {  // csrc/autograd/mlp_maml.cpp
std::tuple<at::Tensor, at::Tensor> mlp_maml_mean(const std::vector<at::Tensor>& params, const at::Tensor& xs,
                                                 const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq,
                                                 const std::vector<at::Tensor>& lrs, const at::Tensor& step_weights,
                                                 bool first_order, int64_t activation, double act_param, int64_t loss);
}  // namespace mamlext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "mamlext compiled kernels; the ops are registered as torch.ops.mamlext.*";
  module.def("build_info", &build_info, "How this extension was compiled.");
  module.def("task_sgd", &task_sgd_eager, "torch.ops.mamlext.task_sgd for eager calls");
  module.def("task_sgd_tensor_lr", &task_sgd_tensor_lr_eager, "torch.ops.mamlext.task_sgd.tensor_lr for eager calls");
  module.def("mlp_forward", &mlp_forward_eager, "torch.ops.mamlext.mlp_forward for eager calls");
  module.def("clone_tensors", &clone_tensors_eager, "torch.ops.mamlext.clone_tensors for eager calls");
  module.def("sgd_update", &sgd_update_eager, "torch.ops.mamlext.sgd_update for eager calls");
  module.def("mlp_maml_mean", &mamlext::mlp_maml_mean,
             "(mean, per-task losses) of torch.ops.mamlext.mlp_maml, the mean's meta-gradient in one autograd node");
}
