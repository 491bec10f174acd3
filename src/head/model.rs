//! The classifier head as a Burn module: standardisation, an optional hidden layer, a linear
//! layer to one logit per label.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// The head's shape: what a saved head needs to be built again before its record is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadShape {
    /// Embedding width it reads.
    pub features: usize,
    /// Units of the hidden layer (`None`: softmax regression, one linear layer).
    pub hidden: Option<usize>,
    /// Number of labels it predicts.
    pub classes: usize,
}

impl HeadShape {
    /// A head of this shape on `device`, standardising with `mean` and `scale` (1 / std) per
    /// feature; the layers get Burn's default initialisation (seed the device for a fixed one).
    pub fn init(&self, mean: &[f32], scale: &[f32], device: &Device) -> Head {
        let constant = |values: &[f32]| {
            Param::from_tensor(Tensor::from_data(
                TensorData::new(values.to_vec(), [self.features]),
                device,
            ))
            .set_require_grad(false)
        };
        let output_inputs = self.hidden.unwrap_or(self.features);
        Head {
            mean: constant(mean),
            scale: constant(scale),
            hidden: self
                .hidden
                .map(|units| LinearConfig::new(self.features, units).init(device)),
            output: LinearConfig::new(output_inputs, self.classes).init(device),
        }
    }
}

/// A classifier over embeddings: `(x - mean) * scale`, then `ReLU(hidden)` if there is one,
/// then the output layer. The standardisation is part of the module (and of its record) but
/// is not trained.
#[derive(Module, Debug)]
pub struct Head {
    mean: Param<Tensor<1>>,
    scale: Param<Tensor<1>>,
    hidden: Option<Linear>,
    output: Linear,
}

impl Head {
    /// Logits, `[rows, classes]`, of embeddings `[rows, features]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = (x - self.mean.val().unsqueeze_dim(0)) * self.scale.val().unsqueeze_dim(0);
        let x = match &self.hidden {
            Some(hidden) => relu(hidden.forward(x)),
            None => x,
        };
        self.output.forward(x)
    }

    /// Class probabilities of each embedding (rows of equal width).
    pub fn probabilities(&self, rows: &[&[f32]]) -> Vec<Vec<f32>> {
        if rows.is_empty() {
            return Vec::new();
        }
        let device = self.output.weight.val().device();
        let width = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let x = Tensor::from_data(TensorData::new(flat, [rows.len(), width]), &device);
        let p = softmax(self.forward(x), 1);
        let classes = p.dims()[1];
        let values = p
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32 probabilities");
        values.chunks(classes).map(<[f32]>::to_vec).collect()
    }
}
