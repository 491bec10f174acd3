//! Weight import: a PyTorch state dict read with burn-store's reader, with BatchNorm folded
//! into the preceding convolutions (inference only), so the network runs one fused conv + bias
//! per layer instead of conv, then four elementwise BatchNorm passes.

use burn_store::pytorch::PytorchReader;
use std::collections::HashMap;
use std::path::Path;

/// Why the weights could not be turned into a network.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file is not a PyTorch checkpoint burn-store can read.
    #[error("cannot read PyTorch checkpoint {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The reader's message.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{0}` missing from the checkpoint")]
    Missing(String),
    /// A tensor has another shape than the architecture expects.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        name: String,
        /// Its shape in the file.
        found: Vec<usize>,
        /// The shape the architecture needs.
        expected: Vec<usize>,
    },
    /// A tensor is stored as another type than float32.
    #[error("tensor `{name}` is {dtype}, expected float32")]
    DType {
        /// Tensor name.
        name: String,
        /// Its type in the file.
        dtype: String,
    },
}

/// A dense float32 tensor taken out of a checkpoint: shape and row-major values.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// All float tensors of a checkpoint by name (`_blocks.3._depthwise_conv.weight`, ...).
#[derive(Debug, Default)]
pub struct StateDict {
    tensors: HashMap<String, RawTensor>,
}

impl StateDict {
    /// Reads every float32 tensor of a legacy or zip PyTorch checkpoint.
    pub fn from_pth(path: &Path) -> Result<Self, WeightsError> {
        let unreadable = |reason: String| WeightsError::Unreadable {
            path: path.display().to_string(),
            reason,
        };
        let reader = PytorchReader::new(path).map_err(|e| unreadable(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, tensor) in reader.into_tensors() {
            let dtype = tensor.dtype();
            if dtype != burn_store::pytorch_reader::DType::F32 {
                // Counters such as `num_batches_tracked` are integers; nothing float is skipped.
                continue;
            }
            let bytes = tensor.read().map_err(|e| unreadable(e.to_string()))?;
            let values = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let shape = tensor.shape().to_vec();
            tensors.insert(name, RawTensor { shape, values });
        }
        Ok(Self { tensors })
    }

    /// Builds a state dict from tensors already in memory (tests, other importers).
    pub fn from_tensors(tensors: HashMap<String, RawTensor>) -> Self {
        Self { tensors }
    }

    /// Number of float tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the checkpoint held no float tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor `name`, checked against the expected shape.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<&RawTensor, WeightsError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing(name.to_string()))?;
        if t.shape != expected {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                found: t.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    /// Convolution `conv` (no bias, OIHW) followed by BatchNorm `bn` in inference mode, folded
    /// into one convolution with bias: `w' = w * g / sqrt(v + eps)`, `b' = beta - m * g / sqrt(v + eps)`.
    pub fn conv_bn_folded(
        &self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
        eps: f32,
    ) -> Result<(RawTensor, RawTensor), WeightsError> {
        let out = shape[0];
        let w = self.get(&format!("{conv}.weight"), &shape)?;
        let gamma = &self.get(&format!("{bn}.weight"), &[out])?.values;
        let beta = &self.get(&format!("{bn}.bias"), &[out])?.values;
        let mean = &self.get(&format!("{bn}.running_mean"), &[out])?.values;
        let var = &self.get(&format!("{bn}.running_var"), &[out])?.values;
        let per_out = w.values.len() / out;
        let mut weight = w.values.clone();
        let mut bias = vec![0f32; out];
        for o in 0..out {
            let scale = gamma[o] / (var[o] + eps).sqrt();
            for v in &mut weight[o * per_out..(o + 1) * per_out] {
                *v *= scale;
            }
            bias[o] = beta[o] - mean[o] * scale;
        }
        Ok((
            RawTensor {
                shape: shape.to_vec(),
                values: weight,
            },
            RawTensor {
                shape: vec![out],
                values: bias,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], values: &[f32]) -> RawTensor {
        RawTensor {
            shape: shape.to_vec(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn folding_reproduces_conv_then_batchnorm() {
        // Two output channels, one input channel, 1x1 kernel.
        let mut m = HashMap::new();
        m.insert("c.weight".into(), t(&[2, 1, 1, 1], &[2.0, -3.0]));
        m.insert("b.weight".into(), t(&[2], &[0.5, 2.0]));
        m.insert("b.bias".into(), t(&[2], &[1.0, -1.0]));
        m.insert("b.running_mean".into(), t(&[2], &[0.25, 4.0]));
        m.insert("b.running_var".into(), t(&[2], &[3.999, 0.999]));
        let sd = StateDict::from_tensors(m);
        let (w, b) = sd.conv_bn_folded("c", "b", [2, 1, 1, 1], 1e-3).unwrap();
        for x in [-1.5f32, 0.0, 2.0] {
            // Unfolded: bn(conv(x)) = (w x - mean) / sqrt(var + eps) * gamma + beta
            let c0 = ((2.0 * x - 0.25) / 2.0) * 0.5 + 1.0;
            let c1 = ((-3.0 * x - 4.0) / 1.0) * 2.0 - 1.0;
            assert!((w.values[0] * x + b.values[0] - c0).abs() < 1e-5);
            assert!((w.values[1] * x + b.values[1] - c1).abs() < 1e-5);
        }
    }

    #[test]
    fn wrong_shape_is_named() {
        let mut m = HashMap::new();
        m.insert("c.weight".into(), t(&[1, 1, 1, 1], &[1.0]));
        let sd = StateDict::from_tensors(m);
        let err = sd.get("c.weight", &[2, 1, 1, 1]).unwrap_err();
        assert!(err.to_string().contains("c.weight"), "{err}");
        assert!(matches!(
            sd.get("nope", &[1]),
            Err(WeightsError::Missing(_))
        ));
    }
}
