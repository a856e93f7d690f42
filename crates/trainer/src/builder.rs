//! [`TrainerBuilder`]: a new run or the continuation of one, with the gradient synchronization
//! and the optimizer plugged in.

use std::path::Path;
use std::sync::Arc;

use burn::tensor::backend::{AutodiffBackend, Backend};
use kiln_bpe::{TokenShard, Tokenizer};
use kiln_transformer::{ModelConfig, Transformer};

use crate::checkpoint::{self, TrainerState};
use crate::config::{ModelSpec, Precision, TrainConfig};
use crate::distill::Teacher;
use crate::error::{Result, TrainError};
use crate::memory;
use crate::optimizer::{GroupedAdamW, OptimizerStep};
use crate::parallel::{GradientSync, SingleProcess};
use crate::precision::{LossScaler, materialize};
use crate::trainer::{Parts, Trainer};

/// Held while a new run seeds Burn's random generator and draws the initial weights.
static INIT_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The optimizer a run trains with, as the trainer holds it.
pub type BoxedOptimizer<B> = Box<dyn OptimizerStep<B, Transformer<B>>>;

/// Makes the optimizer for a model and its run's configuration.
pub type OptimizerFactory<B> =
    Box<dyn FnOnce(&Transformer<B>, &TrainConfig) -> Result<BoxedOptimizer<B>>>;

/// Builds a [`Trainer`] with custom seams: `Trainer::builder(device).gradient_sync(ddp)
/// .optimizer(zero1).start(config, run_dir)` (or `.resume(run_dir, max_steps)`). Without them it
/// is [`Trainer::new`] / [`Trainer::resume`]: one process and [`GroupedAdamW::for_config`].
pub struct TrainerBuilder<B: AutodiffBackend> {
    device: B::Device,
    sync: Box<dyn GradientSync<B>>,
    optimizer: Option<OptimizerFactory<B>>,
}

/// The run's `train.bin` and `val.bin` shards.
pub fn open_shards(config: &TrainConfig) -> Result<(Arc<TokenShard>, Arc<TokenShard>)> {
    let train = TokenShard::open(config.data_dir.join("train.bin"))?;
    let val = TokenShard::open(config.data_dir.join("val.bin"))?;
    Ok((Arc::new(train), Arc::new(val)))
}

/// The tokenizer a config names and the model structure it resolves to.
pub fn resolve(config: &TrainConfig) -> Result<(Option<Tokenizer>, ModelConfig)> {
    let tokenizer = config
        .tokenizer
        .as_ref()
        .map(Tokenizer::from_file)
        .transpose()?;
    let model_config = config
        .model
        .resolve(tokenizer.as_ref().map(Tokenizer::vocab_size))?;
    Ok((tokenizer, model_config))
}

/// Keeps a resumed run's global batch (rows per micro-batch over all ranks) when it continues on
/// a different number of ranks: each rank's `micro_batch` becomes the global rows over the new
/// world size, so every rank reads the same rows of the same batches as before.
fn reshard_batch(state: &mut TrainerState, world: usize) -> Result<()> {
    let old = state.world_size.max(1);
    if old == world {
        return Ok(());
    }
    let rows = state.config.micro_batch * old;
    if world == 0 || !rows.is_multiple_of(world) {
        return Err(TrainError::Config(format!(
            "the run trained on {old} rank(s) with {} rows each: {rows} rows per micro-batch do \
             not split evenly over {world} ranks (use a world size that divides {rows})",
            state.config.micro_batch
        )));
    }
    state.config.micro_batch = rows / world;
    state.world_size = world;
    Ok(())
}

/// A new run's config completed and checked: the tokenizer `kiln data prepare` left beside the
/// shards when none is named; returns the tokenizer and the model structure.
pub fn prepare_new_run(config: &mut TrainConfig) -> Result<(Option<Tokenizer>, ModelConfig)> {
    let start = config
        .init_from
        .as_ref()
        .map(|from| {
            kiln_transformer::inspect_model(from)
                .map_err(|e| TrainError::Config(format!("init_from {}: {e}", from.display())))
        })
        .transpose()?;
    if let Some(start) = &start {
        config.model = ModelSpec::Full(start.config.clone());
    }
    if config.tokenizer.is_none() {
        let beside = config.data_dir.join("tokenizer.json");
        config.tokenizer = beside
            .exists()
            .then_some(beside)
            .or_else(|| start.and_then(|s| s.tokenizer));
    }
    let (tokenizer, model_config) = resolve(config)?;
    config.validate(&model_config)?;
    if let Some(tokenizer) = &tokenizer
        && tokenizer.vocab_size() > model_config.vocab_size
    {
        return Err(TrainError::Config(format!(
            "the tokenizer has {} tokens but the model only {} embeddings",
            tokenizer.vocab_size(),
            model_config.vocab_size
        )));
    }
    Ok((tokenizer, model_config))
}

/// A new run's first weights: those of `config.init_from` when it names a model (checked to have
/// the structure `model_config`), else a random initialization from `config.seed`
/// ([`init_model`]).
pub fn initial_model<B: Backend>(
    config: &TrainConfig,
    model_config: &ModelConfig,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let Some(from) = &config.init_from else {
        return init_model(model_config, config.seed, device);
    };
    let loaded = kiln_transformer::load_model::<B>(from, device)?;
    if loaded.model.config() != model_config {
        return Err(TrainError::Config(format!(
            "init_from {}: the model's structure changed since the run started",
            from.display()
        )));
    }
    Ok(loaded.model)
}

/// A new model with the initial weights `seed` gives, drawn now (Burn initializes parameters
/// lazily). Burn's CPU generator is process-wide: ranks on threads of one process take turns,
/// so none draws from another's sequence, and every rank given the same seed gets the same
/// weights.
pub fn init_model<B: Backend>(
    model_config: &ModelConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Transformer<B>> {
    let _turn = INIT_TURN.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(device, seed);
    let model = model_config.init::<B>(device)?;
    materialize(&model);
    Ok(model)
}

impl<B: AutodiffBackend> TrainerBuilder<B> {
    /// A builder for a trainer on `device`: one process, the default optimizer.
    pub fn new(device: B::Device) -> Self {
        Self {
            device,
            sync: Box::new(SingleProcess),
            optimizer: None,
        }
    }

    /// Combines gradients and global numbers across ranks with `sync` (default:
    /// [`SingleProcess`]). Rank 0 writes the run directory's files; every rank reads its own
    /// share of each batch.
    pub fn gradient_sync(mut self, sync: impl GradientSync<B> + 'static) -> Self {
        self.sync = Box::new(sync);
        self
    }

    /// Updates the model with the optimizer `make` returns for the (initialized or restored)
    /// model and the run's configuration (default: [`GroupedAdamW::for_config`]). On resume its
    /// [`OptimizerStep::load`] restores the state from the checkpoint.
    pub fn optimizer<F>(mut self, make: F) -> Self
    where
        F: FnOnce(&Transformer<B>, &TrainConfig) -> Result<BoxedOptimizer<B>> + 'static,
    {
        self.optimizer = Some(Box::new(make));
        self
    }

    fn make_optimizer(
        &mut self,
        model: &Transformer<B>,
        config: &TrainConfig,
    ) -> Result<BoxedOptimizer<B>> {
        match self.optimizer.take() {
            Some(make) => make(model, config),
            None => Ok(Box::new(GroupedAdamW::for_config(model, config))),
        }
    }

    /// Starts a new run in `run_dir` (created if needed).
    pub fn start(
        mut self,
        mut config: TrainConfig,
        run_dir: impl AsRef<Path>,
    ) -> Result<Trainer<B>> {
        let run_dir = run_dir.as_ref().to_owned();
        let (tokenizer, model_config) = prepare_new_run(&mut config)?;
        let teacher = load_teacher::<B>(&config, &model_config, tokenizer.as_ref(), &self.device)?;
        let backend = B::name(&self.device);
        // CPU backends share the host's memory; elsewhere only an explicit budget is checked.
        let host_memory = backend.contains("flex") || backend.contains("ndarray");
        if let Some(available) = memory::available_bytes(&config, host_memory) {
            // bf16 products (Flex on AVX512_BF16 CPUs) keep every tensor in f32, with no copy:
            // the memory of an f32 run.
            let mut sized = config.clone();
            if config.precision.linear_products::<B>().is_some() {
                sized.precision = Precision::F32;
            }
            memory::check_fits(&model_config, &sized, available, self.sync.world_size())?;
        }
        let shards = open_shards(&config)?;
        if self.sync.rank() == 0 {
            let path = run_dir.join("config.toml");
            kiln_gguf::atomic::write(&path, config.to_toml()?.as_bytes())
                .map_err(|e| TrainError::io(&path, e))?;
        }
        // Every rank draws the same initial weights from `seed` (or reads the same file).
        let model = initial_model::<B>(&config, &model_config, &self.device)?;
        let model = self.sync.broadcast_parameters(model)?;
        let optimizer = self.make_optimizer(&model, &config)?;
        let state = TrainerState {
            step: 0,
            lr_scale: 1.0,
            tokens_seen: 0,
            val_loss: None,
            loss_scaler: LossScaler::for_precision(
                config.precision,
                config.loss_scale_growth_interval,
            ),
            config,
            world_size: self.sync.world_size(),
        };
        Ok(Trainer::assemble(Parts {
            state,
            model_config,
            model,
            optimizer,
            sync: self.sync,
            run_dir,
            device: self.device,
            shards,
            tokenizer,
            teacher,
        }))
    }

    /// Continues the run in `run_dir` from its newest checkpoint, optionally to a new `max_steps`.
    pub fn resume(
        mut self,
        run_dir: impl AsRef<Path>,
        max_steps: Option<u64>,
    ) -> Result<Trainer<B>> {
        let run_dir = run_dir.as_ref().to_owned();
        let dir = checkpoint::latest_checkpoint(&run_dir)?;
        let mut state = checkpoint::load_state(&dir)?;
        if let Some(m) = max_steps {
            state.config.max_steps = m;
        }
        reshard_batch(&mut state, self.sync.world_size())?;
        let (tokenizer, model_config) = resolve(&state.config)?;
        let teacher = load_teacher::<B>(
            &state.config,
            &model_config,
            tokenizer.as_ref(),
            &self.device,
        )?;
        let shards = open_shards(&state.config)?;
        let model = checkpoint::load_model_state(
            &dir,
            model_config.init::<B>(&self.device)?,
            &self.device,
        )?;
        let mut optimizer = self.make_optimizer(&model, &state.config)?;
        optimizer.load(&dir, &self.device)?;
        Ok(Trainer::assemble(Parts {
            state,
            model_config,
            model,
            optimizer,
            sync: self.sync,
            run_dir,
            device: self.device,
            shards,
            tokenizer,
            teacher,
        }))
    }
}

/// The run's distillation teacher, if its config names one.
fn load_teacher<B: AutodiffBackend>(
    config: &TrainConfig,
    model_config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
    device: &B::Device,
) -> Result<Option<Teacher<B>>> {
    config
        .distill
        .as_ref()
        .map(|d| Teacher::load(d, model_config.vocab_size, tokenizer, device))
        .transpose()
}
