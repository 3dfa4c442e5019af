-- Argo CD health check for dpo-operator.io/DPOJob, laid out as argo-cd's resource_customizations/ (with
-- health_test.yaml and testdata/). Install: argocd-cm data key
-- `resource.customizations.health.dpo-operator.io_DPOJob` = this file's content.
hs = {}
if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the dpo-operator to pick up the DPOJob"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the dpo-operator to observe generation " .. obj.metadata.generation
  return hs
end
local message = ""
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" and condition.message ~= nil then
      message = condition.reason .. ": " .. condition.message
    end
  end
end
local phase = obj.status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Training finished"
  if obj.status.model ~= nil and obj.status.model.commitUrl ~= nil then
    hs.message = "Training finished: " .. obj.status.model.commitUrl
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = message
else
  hs.status = "Progressing"
  hs.message = message
  if obj.status.stage ~= nil and obj.status.progress ~= nil and obj.status.progress.percent ~= nil then
    hs.message = "Stage " .. obj.status.stage .. ", " .. obj.status.progress.percent .. "% — " .. message
  end
end
return hs
